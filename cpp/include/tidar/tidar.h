// The TiDAR C++ runtime: everything a service needs to decode an exported artifact.
#pragma once

#include "tidar/backend.h"
#include "tidar/contract.h"
#include "tidar/device_backend.h"
#include "tidar/error.h"
#include "tidar/layout.h"
#include "tidar/loop.h"
#include "tidar/manifest.h"
#include "tidar/ort_backend.h"
#include "tidar/rng.h"
#include "tidar/sampling.h"
#include "tidar/stats.h"
