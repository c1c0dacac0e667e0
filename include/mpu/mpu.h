/// \file
/// Includes the whole public API of torch-mpu.
#pragma once

#include "mpu/config.h"
#include "mpu/defaults.h"
#include "mpu/error.h"
#include "mpu/version.h"
#include "mpu/communicator.h"
#include "mpu/launch.h"
