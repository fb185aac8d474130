// sluice/sluice.hpp — umbrella header: includes every public sluice component.
//
// For convenience only; every header stands alone, and including just what you use keeps build
// times down. The test clock (sluice/testing/manual_clock.hpp) is not included here.
#pragma once

#include "backoff.hpp"
#include "channel.hpp"
#include "clock.hpp"
#include "deadline.hpp"
#include "dispatch_pipeline.hpp"
#include "event_count.hpp"
#include "key_lock_table.hpp"
#include "limiter.hpp"
#include "ready_accumulator.hpp"
#include "reconcile_pipeline.hpp"
#include "requeue_queue.hpp"
#include "task_group.hpp"
#include "write_behind.hpp"
