// Names the Example block of <sluice/backoff.hpp> uses without declaring them.
#pragma once
#include "common.prelude.hpp"
#include <sluice/requeue_queue.hpp>

extern std::string key;
extern int item;
extern sluice::requeue_queue<std::string, int> queue;
void report_given_up(const std::string& key, std::size_t failures);
