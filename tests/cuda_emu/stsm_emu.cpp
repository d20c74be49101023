// The stmatrix .trans test kernel (test_kernels/stmatrix_trans.cu, passed through ptx_source.py) on
// the emulator: see tests/test_cuda_emu_features.py.
#include "sm90_emu.h"

#include "stmatrix_trans.cu"

#include "emu_api.h"
