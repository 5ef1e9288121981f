# ASan/UBSan over the C++ code. Applied at directory level to C++ compile and link options only:
# nvcc device code is not instrumented, and CUDA is switched off in sanitizer builds.
if(KVCORE_SANITIZE)
  string(REPLACE ";" "," _kvcore_san "${KVCORE_SANITIZE}")
  add_compile_options($<$<COMPILE_LANGUAGE:CXX>:-fsanitize=${_kvcore_san}>
                      $<$<COMPILE_LANGUAGE:CXX>:-fno-omit-frame-pointer>
                      $<$<COMPILE_LANGUAGE:CXX>:-fno-sanitize-recover=undefined>)
  add_link_options(-fsanitize=${_kvcore_san})
  if(NOT KVCORE_CUDA STREQUAL "OFF")
    message(STATUS "kvcore: sanitizer build, CUDA switched off")
    set(KVCORE_CUDA "OFF" CACHE STRING "" FORCE)
  endif()
endif()
