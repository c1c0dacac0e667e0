// Include this instead of <catch2/catch.hpp> in tests that use LibTorch. Debian's LibTorch
// pulls in glog, whose CHECK macro would replace Catch's (a failing one-argument CHECK would then
// abort the process instead of reporting). LibTorch goes first, glog's CHECK is dropped, and
// Catch defines its own.
#pragma once

#include <torch/torch.h>

#undef CHECK
#include <catch2/catch.hpp>
