// host stand-in for <cuda_runtime.h> (emulated CUDA, tests only): everything is in sm90_emu.h
#pragma once
#include "sm90_emu.h"
