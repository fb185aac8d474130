// The event_count tests again, against the portable mutex + condition variable parking.
#define SLUICE_PORTABLE_PARKING 1
#include "event_count_test.cpp"  // NOLINT(bugprone-suspicious-include)
