// Catch2 for tests that use LibTorch. Include this instead of <catch2/catch.hpp>.
//
// LibTorch's logging headers (glog's, or c10's own) define a CHECK macro that aborts the process,
// and whichever of the two headers comes last owns CHECK. LibTorch comes first here, so CHECK is
// Catch's; include this before any other LibTorch header of the test.
#pragma once

#include <torch/torch.h>

#include <catch2/catch.hpp>
