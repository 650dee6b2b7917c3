#ifndef CNNC_PRECISION_H
#define CNNC_PRECISION_H
// The rounding of GEMM operands to a layer's precision (cnnc/precision.py holds the same
// functions in numpy, bit for bit): tf32 as PTX cvt.rna.tf32.f32 (to nearest, ties away from
// zero, 10 mantissa bits), bf16 as cvt.rn.bf16.f32 (to nearest, ties to even, 7 mantissa
// bits), both kept in a float.  A NaN stays a NaN, made quiet; a magnitude rounding past the
// largest float becomes infinite.  Written once for CUDA and OpenCL C; the bit casts are the
// only spelling that differs, so they are named here rather than in every prelude.
#ifdef __CUDACC__
#define CNNC_FLOAT_AS_UINT(x) (__float_as_uint(x))
#define CNNC_UINT_AS_FLOAT(x) (__uint_as_float(x))
#else
#define CNNC_FLOAT_AS_UINT(x) (as_uint(x))
#define CNNC_UINT_AS_FLOAT(x) (as_float(x))
#endif

// bits + increment with the dropped low bits cleared; a NaN is made quiet instead of rounded
// (its payload could otherwise carry into the exponent or vanish, making it infinite)
CNNC_DEVICE_FN float cnnc_round_dropping(unsigned int bits, unsigned int increment, unsigned int keep)
{
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u)
        return CNNC_UINT_AS_FLOAT((bits | 0x00400000u) & keep);
    return CNNC_UINT_AS_FLOAT((bits + increment) & keep);
}

// tf32 in integers: half an ulp of the kept bits added to the magnitude, so ties go away from zero
CNNC_DEVICE_FN float cnnc_round_tf32_bits(float x)
{
    return cnnc_round_dropping(CNNC_FLOAT_AS_UINT(x), 0x1000u, 0xFFFFE000u);
}

CNNC_DEVICE_FN float cnnc_round_tf32(float x)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return __uint_as_float(r);
#else
    return cnnc_round_tf32_bits(x);
#endif
}

// bf16: half an ulp less one, plus the lowest kept bit, so ties go to the even neighbour
CNNC_DEVICE_FN float cnnc_round_bf16(float x)
{
    const unsigned int bits = CNNC_FLOAT_AS_UINT(x);
    return cnnc_round_dropping(bits, 0x7FFFu + ((bits >> 16) & 1u), 0xFFFF0000u);
}
#endif
