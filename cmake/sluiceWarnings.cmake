# Warning flags for sluice's own tests, benchmarks and examples (never for consumers of the
# library: the INTERFACE target carries no flags). SLUICE_WERROR is set by the presets.
option(SLUICE_WERROR "Treat warnings as errors in sluice's own targets" OFF)

function(sluice_set_warnings target)
  target_compile_options(${target} PRIVATE -Wall -Wextra -Wpedantic -Wshadow)
  if(SLUICE_WERROR)
    target_compile_options(${target} PRIVATE -Werror)
  endif()
endfunction()
