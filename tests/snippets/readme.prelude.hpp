// Names README.md's code blocks use without declaring them: a reader's own types and functions.
// Declarations only (the generated file is compiled, never linked or run). The generated file
// includes <sluice/sluice.hpp> and <sluice/testing/manual_clock.hpp> before this.
#pragma once
#include "common.prelude.hpp"

struct job { int id = 0; };
struct reading { int sensor = 0; double value = 0; };
struct entity_t { std::string uid; int generation = 0; };

void run(job&);
void handle(const std::vector<reading>&);
void dead_letter(reading&&);
void dead_letter(const std::string& key);
void do_work();
void reconcile(const entity_t&);
void log(const std::exception_ptr&);
