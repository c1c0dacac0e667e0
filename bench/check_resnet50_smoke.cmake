# ctest bench.resnet50_smoke: runs bench_resnet50 on 2 CPU processes (Gloo) for every strategy
# and both precisions, a few iterations of a small ResNet-18, and checks the JSON it wrote: one
# row per configuration, each with ok = true, a positive images/s, a finite loss and one entry
# per rank in the per-rank arrays.
#   cmake -DBENCH=path/to/bench_resnet50 -DJSON=out.json -P check_resnet50_smoke.cmake
set(strategies master replicated sharded)
set(precisions fp32 bf16)
set(ranks 2)
file(REMOVE "${JSON}")
list(JOIN strategies "," strategy_arg)
list(JOIN precisions "," precision_arg)
execute_process(
  COMMAND "${BENCH}" --device cpu --gpus ${ranks} --precision ${precision_arg}
          --strategy ${strategy_arg} --arch resnet18 --image-size 32 --classes 10
          --batch-size 4 --warmup 1 --iters 2 --row-time-limit 240 --json "${JSON}"
  RESULT_VARIABLE result)
if(NOT EXISTS "${JSON}")
  message(FATAL_ERROR "bench_resnet50 wrote no JSON to ${JSON} (exit status ${result})")
endif()
file(READ "${JSON}" doc)
string(JSON rows LENGTH "${doc}" results)
list(LENGTH strategies ns)
list(LENGTH precisions np)
math(EXPR expected "${ns} * ${np}")
if(NOT rows EQUAL expected)
  message(FATAL_ERROR "${JSON} has ${rows} rows, expected ${expected}")
endif()
math(EXPR last "${rows} - 1")
foreach(i RANGE ${last})
  string(JSON strategy GET "${doc}" results ${i} strategy)
  string(JSON precision GET "${doc}" results ${i} precision)
  string(JSON ok GET "${doc}" results ${i} ok)
  if(NOT ok)
    string(JSON error ERROR_VARIABLE no_error GET "${doc}" results ${i} error)
    message(FATAL_ERROR "row ${i} (${precision}, ${strategy}) failed: ${error}")
  endif()
  string(JSON ips GET "${doc}" results ${i} images_per_s)
  string(JSON loss GET "${doc}" results ${i} final_loss)
  string(JSON nsec LENGTH "${doc}" results ${i} rank_seconds)
  string(JSON nstate LENGTH "${doc}" results ${i} optimizer_state_bytes)
  if(NOT ips GREATER 0 OR loss STREQUAL "null" OR NOT nsec EQUAL ranks OR NOT nstate EQUAL ranks)
    message(FATAL_ERROR "row ${i} (${precision}, ${strategy}): images_per_s ${ips}, final_loss "
                        "${loss}, ${nsec} rank times and ${nstate} optimizer-state sizes for "
                        "${ranks} ranks")
  endif()
  message(STATUS "${precision} ${strategy}: ${ips} images/s, loss ${loss}")
endforeach()
if(NOT result EQUAL 0)
  message(FATAL_ERROR "bench_resnet50 exited with ${result} although every row succeeded")
endif()
