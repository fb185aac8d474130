# Compiles one translation unit and checks the outcome (run by CTest with cmake -P).
#   CXX      the compiler          SOURCE   the .cpp file        INCLUDE  sluice's include dir
#   EXPECT   the text the one error must contain; empty: the file must compile cleanly
# Passes only if the compilation fails, the output contains EXPECT, and the compiler reports exactly
# one error (no cascade from inside the library's hash tables).
execute_process(
  COMMAND "${CXX}" -std=c++20 -fsyntax-only "-I${INCLUDE}" "${SOURCE}"
  RESULT_VARIABLE rc
  OUTPUT_VARIABLE out
  ERROR_VARIABLE out)
if(EXPECT STREQUAL "")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "expected ${SOURCE} to compile, but it failed:\n${out}")
  endif()
  return()
endif()
if(rc EQUAL 0)
  message(FATAL_ERROR "expected ${SOURCE} not to compile, but it compiled")
endif()
string(FIND "${out}" "${EXPECT}" where)
if(where EQUAL -1)
  message(FATAL_ERROR "the compiler's output lacks the readable message \"${EXPECT}\":\n${out}")
endif()
string(REGEX MATCHALL "error:" errors "${out}")
list(LENGTH errors count)
if(NOT count EQUAL 1)
  message(FATAL_ERROR "expected exactly one error, got ${count}:\n${out}")
endif()
if(out MATCHES "([0-9]+) errors? generated" AND NOT CMAKE_MATCH_1 EQUAL 1)
  message(FATAL_ERROR "expected exactly one error, the compiler counted ${CMAKE_MATCH_1}:\n${out}")
endif()
message(STATUS "one error, with the readable message:\n${out}")
