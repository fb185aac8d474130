// Names the Example block of <sluice/write_behind.hpp> uses without declaring them.
#pragma once
#include "common.prelude.hpp"
#include <span>

struct database {
  template <class Row> bool upsert(const Row&) { return true; }
};
extern database db;
