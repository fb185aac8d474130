# Issue 12.2: a downstream project that vendors sluice with add_subdirectory and installs its own
# exported target linking sluice::sluice.
#   -DEXPECT=works  configure with -DSLUICE_INSTALL=ON, build, install to a scratch prefix, then
#                   build and run a third project that only does find_package(app) against it
#   -DEXPECT=fails  configure without SLUICE_INSTALL and require CMake's export-set error
#                   (what the README documents), so the advice stays true
# Invoked by CTest with -DEXPECT=... -DSLUICE_SOURCE_DIR=... -DEXPORTER_DIR=... -DUSER_DIR=...
# -DWORK_DIR=... -DCXX_COMPILER=... -DGENERATOR=...
file(REMOVE_RECURSE ${WORK_DIR})
set(common -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=Release)

function(run_step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "step failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
endfunction()

if(EXPECT STREQUAL "fails")
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${EXPORTER_DIR} -B ${WORK_DIR}/exporter ${common}
      -DSLUICE_SOURCE_DIR=${SLUICE_SOURCE_DIR}
    RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc EQUAL 0)
    message(FATAL_ERROR "configuring without SLUICE_INSTALL=ON succeeded; update the README")
  endif()
  if(NOT "${out}${err}" MATCHES "requires target \"sluice\" that is not in any export set")
    message(FATAL_ERROR "unexpected configure error (the README quotes another one):\n${out}\n${err}")
  endif()
  message(STATUS "without SLUICE_INSTALL=ON, as documented: requires target \"sluice\" that is not in any export set")
elseif(EXPECT STREQUAL "works")
  set(prefix ${WORK_DIR}/prefix)
  run_step(${CMAKE_COMMAND} -S ${EXPORTER_DIR} -B ${WORK_DIR}/exporter ${common}
    -DSLUICE_SOURCE_DIR=${SLUICE_SOURCE_DIR} -DSLUICE_INSTALL=ON)
  run_step(${CMAKE_COMMAND} --build ${WORK_DIR}/exporter)
  run_step(${CMAKE_COMMAND} --install ${WORK_DIR}/exporter --prefix ${prefix})
  run_step(${CMAKE_COMMAND} -S ${USER_DIR} -B ${WORK_DIR}/user ${common} -DCMAKE_PREFIX_PATH=${prefix})
  run_step(${CMAKE_COMMAND} --build ${WORK_DIR}/user)
  run_step(${WORK_DIR}/user/app_user)
else()
  message(FATAL_ERROR "EXPECT must be works or fails, got '${EXPECT}'")
endif()
