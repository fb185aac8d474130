// Names the Example block of <sluice/reconcile_pipeline.hpp> uses without declaring them.
#pragma once
#include "common.prelude.hpp"
#include <stop_token>
#include <string>

struct pod { std::string uid; int version = 0; };
bool apply(const pod&, std::stop_token);
