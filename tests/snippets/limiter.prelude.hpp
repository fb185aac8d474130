// Names the Example block of <sluice/limiter.hpp> uses without declaring them.
#pragma once
#include "common.prelude.hpp"

struct entity_t { std::string uid; };
extern entity_t entity;
void reconcile(const entity_t&);
