// Names the Example block of <sluice/requeue_queue.hpp> uses without declaring them.
#pragma once
#include "common.prelude.hpp"

void reconcile(const std::string& key, int item);
