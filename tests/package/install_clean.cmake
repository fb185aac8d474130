# Issue 12.1: installing sluice must not need the test framework. Copies the source tree (what a
# fresh clone holds: no build/, no .git) to a scratch directory and runs the README's install
# commands there, with Catch2, Google Benchmark, oneTBB and Boost made unfindable
# (CMAKE_DISABLE_FIND_PACKAGE_<name>: a REQUIRED find_package of them is then a configure error).
# Then the downstream consumer is configured against the installed prefix, built and run.
# Invoked by CTest with -DSLUICE_SOURCE_DIR=... -DWORK_DIR=... -DCONSUMER_DIR=...
# -DCXX_COMPILER=... -DGENERATOR=...
file(REMOVE_RECURSE ${WORK_DIR})
set(src ${WORK_DIR}/clone)
set(prefix ${WORK_DIR}/prefix)

function(run_step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
    WORKING_DIRECTORY ${src})
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  set(step_output "${out}${err}" PARENT_SCOPE)
endfunction()

file(MAKE_DIRECTORY ${src})
file(GLOB entries RELATIVE ${SLUICE_SOURCE_DIR} ${SLUICE_SOURCE_DIR}/*)
foreach(entry IN LISTS entries)
  if(NOT entry MATCHES "^(build|\\.git)$")
    file(COPY ${SLUICE_SOURCE_DIR}/${entry} DESTINATION ${src})
  endif()
endforeach()

set(hidden)
foreach(package Catch2 benchmark TBB Boost)
  list(APPEND hidden -DCMAKE_DISABLE_FIND_PACKAGE_${package}=ON)
endforeach()

# The README's commands, verbatim apart from the compiler and the hidden packages.
run_step(${CMAKE_COMMAND} --preset install -DCMAKE_CXX_COMPILER=${CXX_COMPILER} ${hidden})
if(EXISTS ${src}/build/install/tests OR EXISTS ${src}/build/install/examples)
  message(FATAL_ERROR "the install preset configured tests or examples")
endif()
run_step(${CMAKE_COMMAND} --install build/install --prefix ${prefix})
foreach(file include/sluice/sluice.hpp share/cmake/sluice/sluiceConfig.cmake
             share/cmake/sluice/sluiceConfigVersion.cmake share/cmake/sluice/sluiceTargets.cmake)
  if(NOT EXISTS ${prefix}/${file})
    message(FATAL_ERROR "cmake --install did not install ${file}")
  endif()
endforeach()

set(consumer ${WORK_DIR}/consumer)
run_step(${CMAKE_COMMAND} -S ${CONSUMER_DIR} -B ${consumer} -G ${GENERATOR}
  -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=Release
  -DSLUICE_CONSUME_MODE=installed -DCMAKE_PREFIX_PATH=${prefix} ${hidden})
run_step(${CMAKE_COMMAND} --build ${consumer})
run_step(${consumer}/consumer)
message(STATUS "installed from a clean copy without Catch2: ${step_output}")
