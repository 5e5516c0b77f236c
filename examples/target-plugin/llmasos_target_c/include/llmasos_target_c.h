/* Included before the C that TVM's code generator writes (CTarget.export_options: -include).
 * TVM's C code names a few things it does not define:
 *   half -- float16: GCC >= 12 and Clang >= 15 have _Float16 on x86-64 and AArch64 (a vendor compiler
 *           without it would define half as its own 16-bit float type here);
 *   inff -- the float infinity (CUDA's spelling). */
#ifndef LLMASOS_TARGET_C_H
#define LLMASOS_TARGET_C_H
#include <math.h>
typedef _Float16 half;
#define inff INFINITY
#endif
