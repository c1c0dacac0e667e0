/// \file
/// Includes the whole public API of torch-mpu.
#pragma once

#include "mpu/config.h"
#include "mpu/datasets.h"
#include "mpu/defaults.h"
#include "mpu/error.h"
#include "mpu/flat_buffer.h"
#include "mpu/iterator.h"
#include "mpu/scaling.h"
#include "mpu/updater.h"
#include "mpu/version.h"
#include "mpu/batch.h"
#include "mpu/reporter.h"
#include "mpu/trainer.h"
#include "mpu/extensions.h"
