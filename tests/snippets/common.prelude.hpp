// Shared by every generated snippet file (README.md's blocks and the headers' Example blocks):
// what a reader's program would have anyway. Declarations only: snippets are compiled, not run.
#pragma once
#include <cassert>
#include <chrono>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

using namespace std::chrono_literals;
