//! The host mirror of the kernels' counter-based RNG (Philox4x32-10, `kernels/common.cuh`), so that tests can
//! predict every sampled token and users can reproduce a GPU decoding on the CPU.

/// Philox4x32-10 of counter `c` under key `(k0, k1)`.
pub fn philox4x32_10(mut c: [u32; 4], mut k0: u32, mut k1: u32) -> [u32; 4] {
    const M0: u32 = 0xD251_1F53;
    const M1: u32 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    for _ in 0..10 {
        let p0 = M0 as u64 * c[0] as u64;
        let p1 = M1 as u64 * c[2] as u64;
        c = [(p1 >> 32) as u32 ^ c[1] ^ k0, p1 as u32, (p0 >> 32) as u32 ^ c[3] ^ k1, p0 as u32];
        k0 = k0.wrapping_add(W0);
        k1 = k1.wrapping_add(W1);
    }
    c
}

/// The uniform draw in (0, 1) the kernels use for candidate `a` of `row` at decoding `step` under `seed`.
pub fn uniform(seed: u64, row: u32, step: u32, a: u32) -> f32 {
    let r = philox4x32_10([a, row, step, 0], seed as u32, (seed >> 32) as u32);
    ((r[0] >> 8) as f32 + 0.5) * (1.0 / 16_777_216.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_matches_the_random123_known_answer() {
        // Known-answer vectors of Random123's kat_vectors for philox4x32_10.
        assert_eq!(philox4x32_10([0, 0, 0, 0], 0, 0), [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]);
        assert_eq!(
            philox4x32_10([0xffff_ffff; 4], 0xffff_ffff, 0xffff_ffff),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
    }

    #[test]
    fn uniform_is_strictly_inside_the_unit_interval() {
        for a in 0..10_000 {
            let u = uniform(7, 3, 11, a);
            assert!(u > 0.0 && u < 1.0, "{u}");
        }
    }
}
