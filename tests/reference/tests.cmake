# NumPy reference: hf_reference.py writes random Hugging Face checkpoints itself (its own
# safetensors writer), runs `moemesh generate --json --logits`, and compares every logits row and
# the greedy path with its own float64 forward pass. One ctest per case.
set(MOEMESH_REFERENCE_CASES
  mixtral_f32_mha mixtral_f32_gqa2_window mixtral_bf16_gqa4 mixtral_f16_tied
  deepseek_f32_shared deepseek_f32_normtopk_gqa2 deepseek_bf16_norm deepseek_f16_noshared
  cli_errors cli_sampling)
foreach(case ${MOEMESH_REFERENCE_CASES})
  add_test(NAME reference_${case}
           COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/hf_reference.py --cli $<TARGET_FILE:moemesh> --case ${case})
  set_tests_properties(reference_${case} PROPERTIES LABELS unit TIMEOUT 60 ENVIRONMENT OPENBLAS_NUM_THREADS=1)
endforeach()
