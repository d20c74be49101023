// The cluster test kernel (test_kernels/cluster_exchange.cu, passed through ptx_source.py) on the emulator:
// see tests/test_cuda_emu_features.py.
#include "sm90_emu.h"

#include "cluster_exchange.cu"

#include "emu_api.h"
