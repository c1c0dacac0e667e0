/// \file
/// Includes the whole public API of torch-mpu.
#pragma once

#include "mpu/batch.h"
#include "mpu/communicator.h"
#include "mpu/config.h"
#include "mpu/datasets.h"
#include "mpu/defaults.h"
#include "mpu/device_data.h"
#include "mpu/error.h"
#include "mpu/extensions.h"
#include "mpu/flat_buffer.h"
#include "mpu/flat_optimizer.h"
#include "mpu/iterator.h"
#include "mpu/launch.h"
#include "mpu/precision.h"
#include "mpu/reporter.h"
#include "mpu/scaling.h"
#include "mpu/trainer.h"
#include "mpu/updater.h"
#include "mpu/version.h"
