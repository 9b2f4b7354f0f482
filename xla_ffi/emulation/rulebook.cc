// rulebook.cu compiled by the host compiler for the emulator (cuda_emulation.h).
#include "../rulebook.cu"
