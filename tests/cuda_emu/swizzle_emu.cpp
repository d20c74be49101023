// The 64-byte-swizzle test kernel (test_kernels/swizzle64.cu, passed through ptx_source.py) on
// the emulator: see tests/test_cuda_emu_features.py.
#include "sm90_emu.h"

#include "swizzle64.cu"

#include "emu_api.h"
