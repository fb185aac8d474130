// Names the Example block of <sluice/key_lock_table.hpp> uses without declaring them.
#pragma once
#include "common.prelude.hpp"

struct entity_t { std::string uid; };
extern entity_t entity;
extern std::string uid;
void reconcile(const entity_t&);
