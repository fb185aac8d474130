// sluice/sluice.hpp — umbrella header: includes every public sluice component.
//
// For convenience only; every header stands alone, and including just what you use keeps build
// times down.
#pragma once

#include "channel.hpp"
