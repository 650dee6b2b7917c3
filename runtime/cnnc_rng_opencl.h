#ifndef CNNC_RNG_H
#define CNNC_RNG_H
// Philox-4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as
// 1, 2, 3", SC 2011): a counter-based generator, so the random word for a value is a
// pure function of (counter, key) and does not depend on which work-item, work-group or
// device computes it.  Counter and key are passed by value (OpenCL C 1.2, no generic
// address space).  cnnc_rng_cuda.h and cnnc.backends.reference_ops.philox4x32_10 are the
// same generator, checked against the published known-answer vectors.
uint4 cnnc_philox4x32_10(uint c0, uint c1, uint c2, uint c3, uint k0, uint k1)
{
    #pragma unroll
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        const uint hi0 = mul_hi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const uint hi1 = mul_hi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
    }
    return (uint4)(c0, c1, c2, c3);
}
#endif
