// The sparse MLA backward (megatron_dsa/kernels/sparse_mla/cuda/sparse_mla_bwd_sm90.cu) on the
// CPU: the kernel's own source and its sm90_common.cuh, each passed through ptx_source.py (inline
// PTX -> the emulator's PTX interpreter, <<<>>> -> emu::launch), compiled against sm90_emu.h.
// Exports the kernel's own entry points, dsa_sparse_mla_bwd_sm90 and
// dsa_sparse_mla_bwd_packed_sm90, and the emulator's controls (emu_*). See
// tests/test_sparse_mla_bwd_emu.py.
#include "sm90_emu.h"

#include "sparse_mla_bwd_sm90.cu"

#include "emu_api.h"
