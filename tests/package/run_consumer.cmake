# Configures, builds and runs the downstream consumer project in one of three modes.
# Invoked by CTest with -DMODE=... -DSOURCE_DIR=... -DBINARY_DIR=... -DSLUICE_SOURCE_DIR=...
# -DSLUICE_PREFIX=... -DCXX_COMPILER=... -DGENERATOR=...
file(REMOVE_RECURSE ${BINARY_DIR})

function(run_step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

run_step(${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${BINARY_DIR} -G ${GENERATOR}
  -DCMAKE_CXX_COMPILER=${CXX_COMPILER}
  -DCMAKE_BUILD_TYPE=Release
  -DSLUICE_CONSUME_MODE=${MODE}
  -DSLUICE_SOURCE_DIR=${SLUICE_SOURCE_DIR}
  -DCMAKE_PREFIX_PATH=${SLUICE_PREFIX})
run_step(${CMAKE_COMMAND} --build ${BINARY_DIR})
run_step(${BINARY_DIR}/consumer)
