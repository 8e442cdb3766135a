# montage_add_test(<name> LABEL <unit|integration> [TIMEOUT s] SOURCES ... LIBS ...)
# One GoogleTest executable; each test case becomes a CTest test with the label and a timeout.
function(montage_add_test name)
  cmake_parse_arguments(arg "" "LABEL;TIMEOUT" "SOURCES;LIBS" ${ARGN})
  if(NOT arg_TIMEOUT)
    set(arg_TIMEOUT 60)
  endif()
  add_executable(${name} ${arg_SOURCES})
  target_link_libraries(${name} PRIVATE ${arg_LIBS} GTest::gmock GTest::gtest_main montage::warnings)
  target_include_directories(${name} PRIVATE ${PROJECT_SOURCE_DIR})
  gtest_discover_tests(${name}
    PROPERTIES LABELS ${arg_LABEL} TIMEOUT ${arg_TIMEOUT}
    DISCOVERY_TIMEOUT 30)
endfunction()
