#pragma once

// The public C++ API of torch-dopamine.
#include <dopamine/ops.h>
#include <dopamine/optimizer.h>
#include <dopamine/options.h>
#include <dopamine/trajectory.h>
