// The select with 256 threads per CTA (select_sm90.cuh): 10,240 registers, so that one CTA fits
// on an SM beside two bf16 score programs (51,200) when the pipeline overlaps a chunk's select
// with the next chunk's scores (triton_impl, SELECT_OVERLAP).
#define DSA_SELECT_NT 256
#define DSA_SELECT_ENTRY dsa_indexer_select_nt256
#include "select_sm90.cu"
