// The select's 256-thread variant (select_sm90_nt256.cu) on the CPU: select_emu.cpp with
// DSA_SELECT_NT = 256.
#define DSA_SELECT_NT 256
#include "select_emu.cpp"
