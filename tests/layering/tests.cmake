# The layering rule (docs/architecture.md): services/ -> actors/ -> core/ -> kernels/, kernels/
# including only core/dtype.h and core/error.h of core/. Every `#include "..."` is checked; a
# violation is named file:line. The self-test checks the checker on a made-up tree.
add_test(NAME layering_includes
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/check_includes.py --root ${CMAKE_SOURCE_DIR})
add_test(NAME layering_includes_selftest
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/check_includes.py --self-test)
set_tests_properties(layering_includes layering_includes_selftest PROPERTIES LABELS unit TIMEOUT 60)
