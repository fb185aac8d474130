// Names the Example block of <sluice/deadline.hpp> uses without declaring them.
#pragma once
#include "common.prelude.hpp"

extern std::chrono::milliseconds timeout;
