# NumPy reference: hf_reference.py writes random Hugging Face checkpoints itself (its own
# safetensors writer), runs `moemesh generate --json --logits`, and compares every logits row and
# the greedy path with its own float64 forward pass. One ctest per case.
set(MOEMESH_REFERENCE_CASES
  mixtral_f32_mha mixtral_f32_gqa2_window mixtral_bf16_gqa4 mixtral_f16_tied
  deepseek_f32_shared deepseek_f32_normtopk_gqa2 deepseek_bf16_norm deepseek_f16_noshared
  rope_linear rope_dynamic rope_yarn rope_yarn_mixtral rope_llama3
  cli_errors cli_sampling)
foreach(case ${MOEMESH_REFERENCE_CASES})
  add_test(NAME reference_${case}
           COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/hf_reference.py --cli $<TARGET_FILE:moemesh> --case ${case})
  set_tests_properties(reference_${case} PROPERTIES LABELS unit TIMEOUT 60 ENVIRONMENT OPENBLAS_NUM_THREADS=1)
endforeach()

# GPTQ (issue #13): gptq_reference.py writes GPTQ v1 checkpoints (INT4/INT8 experts and attention
# as qweight/qzeros/scales/g_idx) and checks moemesh against hf_reference's float64 forward pass on
# the dequantized weights. Its NumPy pack/unpack self-test needs no binary and runs now.
add_test(NAME reference_gptq_self_test COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/gptq_reference.py --self-test)
set_tests_properties(reference_gptq_self_test PROPERTIES LABELS unit TIMEOUT 60)
# The model and error cases run moemesh on them (core/gptq, kernels/cpu/quant_matrix).
set(MOEMESH_GPTQ_REFERENCE_CASES
  gptq_mixtral_int4_g16_sym gptq_mixtral_int8_gall_asym gptq_mixtral_int4_descact gptq_deepseek_int4_g16_shared
  gptq_errors)
foreach(case ${MOEMESH_GPTQ_REFERENCE_CASES})
  add_test(NAME reference_${case}
           COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/gptq_reference.py --cli $<TARGET_FILE:moemesh> --case ${case})
  set_tests_properties(reference_${case} PROPERTIES LABELS unit TIMEOUT 60)
endforeach()
# The GPTQ algorithm itself: gptq_quantizer_reference.py is an independent NumPy GPTQ (one column at
# a time, numpy.linalg's Cholesky); test_gptq_quantizer runs it on the cases core/gptq_quantizer
# solves too. Its self-test checks the reference alone (GPTQ's output error well below RTN's).
add_test(NAME reference_gptq_quantizer_self_test
         COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/gptq_quantizer_reference.py --self-test)
set_tests_properties(reference_gptq_quantizer_self_test PROPERTIES LABELS unit TIMEOUT 60)
# LoRA (issue #16): lora_reference.py writes PEFT adapters (adapter_config.json +
# adapter_model.safetensors, base_model.model.<module>.lora_A/lora_B.weight) for hf_reference's
# checkpoints and checks `moemesh generate --lora DIR` against hf_reference's float64 forward pass on
# the merged weights W + s·B·A (rounded to the base dtype for a bf16 base). Its self-test (merge vs
# direct evaluation, adapter files read back, adapter strength) needs no binary.
add_test(NAME reference_lora_self_test COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/lora_reference.py --self-test)
set_tests_properties(reference_lora_self_test PROPERTIES LABELS unit TIMEOUT 60)
set(MOEMESH_LORA_REFERENCE_CASES
  lora_mixtral_attn lora_mixtral_experts lora_deepseek_attn lora_deepseek_experts lora_mixtral_bf16_all
  lora_errors)
foreach(case ${MOEMESH_LORA_REFERENCE_CASES})
  add_test(NAME reference_${case}
           COMMAND ${SYSTEM_PYTHON} ${CMAKE_CURRENT_LIST_DIR}/lora_reference.py --cli $<TARGET_FILE:moemesh> --case ${case})
  set_tests_properties(reference_${case} PROPERTIES LABELS unit TIMEOUT 60 ENVIRONMENT OPENBLAS_NUM_THREADS=1)
endforeach()
