// Names the Example block of <sluice/task_group.hpp> uses without declaring them.
#pragma once
#include "common.prelude.hpp"

struct entry_t { std::string key; };
extern std::vector<entry_t> queue;
void reconcile(entry_t&);
void log(const std::exception_ptr&);
