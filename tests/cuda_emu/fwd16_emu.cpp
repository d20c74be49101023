// The sparse MLA 16-head forward (megatron_dsa/kernels/sparse_mla/cuda/sparse_mla_fwd16_sm90.cu)
// on the CPU: the kernel's own source and its sm90_common.cuh, each passed through
// ptx_source.py (inline PTX -> the emulator's PTX interpreter, <<<>>> -> emu::launch), compiled
// against sm90_emu.h. Exports the kernel's own entry point, dsa_sparse_mla_fwd16_sm90, and the
// emulator's controls (emu_*). See tests/test_sparse_mla_fwd16_emu.py.
#include "sm90_emu.h"

#include "sparse_mla_fwd16_sm90.cu"

#include "emu_api.h"
