# Warnings for all kvcore C++ and CUDA sources (added per target by kvcore_set_warnings), and no
# floating-point contraction in host code: the CPU backend must round exactly as the CUDA kernels
# do where they use explicitly rounded operations (INT4 quantization, dequantization).
function(kvcore_set_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wno-unused-parameter -ffp-contract=off>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra,-Wno-unused-parameter,-ffp-contract=off>)
endfunction()
