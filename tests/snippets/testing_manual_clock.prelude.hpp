// Names the Example block of <sluice/testing/manual_clock.hpp> uses without including them.
#pragma once
#include "common.prelude.hpp"
#include <sluice/requeue_queue.hpp>
