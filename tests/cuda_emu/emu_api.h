// The emulator's controls (emu_*), exported by each emulated kernel library (fwd_pp_emu.cpp,
// bwd_emu.cpp) next to the kernel's own entry points.
#pragma once
#include "sm90_emu.h"

extern "C" {

// seed: 0 = no slowdowns; else the seed of the warpgroups' random slowdowns. wait_limit_s: a
// wait longer than this is reported as a deadlock (and every wait is released).
void emu_reset(unsigned seed, double wait_limit_s) {
  std::lock_guard<std::mutex> lock(emu::mu);
  emu::seed = seed;
  emu::wait_limit_s = wait_limit_s;
  emu::hazards = 0;
  emu::messages.clear();
  emu::aborted = false;
}

long emu_hazards() { return emu::hazards.load(); }

int emu_aborted() { return emu::aborted.load() ? 1 : 0; }

// message i (distinct hazards, first occurrences) into buf; returns its length, -1 past the last
int emu_message(int i, char* buf, int n) {
  std::lock_guard<std::mutex> lock(emu::mu);
  if (i < 0 || i >= static_cast<int>(emu::messages.size())) return -1;
  std::snprintf(buf, static_cast<size_t>(n), "%s", emu::messages[i].c_str());
  return static_cast<int>(emu::messages[i].size());
}

}  // extern "C"
