# `moemesh finetune` on a toy task (tests/finetune/finetune_toy.py): the small Mixtral preset learns
# 50 prompt -> answer facts. finetune_toy_train trains (loss down >= 10x, files written, >= 90% exact
# answers with the training forward pass); finetune_toy_serve serves the adapter it left through
# `moemesh up --lora-modules` and checks the answers the official `openai` npm client gets from /v1/chat/completions.
set(MOEMESH_FINETUNE_WORKDIR ${CMAKE_BINARY_DIR}/finetune_toy)
add_test(NAME finetune_toy_train
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/finetune_toy.py --mode train --self-check
                 --cli $<TARGET_FILE:moemesh> --workdir ${MOEMESH_FINETUNE_WORKDIR})
set_tests_properties(finetune_toy_train PROPERTIES LABELS integration TIMEOUT 1200 RUN_SERIAL TRUE
                     FIXTURES_SETUP finetune_toy ENVIRONMENT "PYTHONDONTWRITEBYTECODE=1")
add_test(NAME finetune_toy_serve
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/finetune_toy.py --mode serve
                 --cli $<TARGET_FILE:moemesh> --router $<TARGET_FILE:moemesh-router>
                 --workdir ${MOEMESH_FINETUNE_WORKDIR} --cache-dir ${MOEMESH_CACHE_DIR})
set_tests_properties(finetune_toy_serve PROPERTIES LABELS integration TIMEOUT 600 RUN_SERIAL TRUE
                     FIXTURES_REQUIRED finetune_toy ENVIRONMENT "OPENBLAS_NUM_THREADS=1;PYTHONDONTWRITEBYTECODE=1")
