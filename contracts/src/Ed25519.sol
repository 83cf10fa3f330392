// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

/// @title Ed25519
/// @notice Ed25519 signature verification (RFC 8032, section 5.1.7), written from the RFC for the
/// registry's node-key proofs. Returns false, never reverts, for any malformed key, signature or
/// scalar.
/// @dev Encodings: a bytes32 holds the 32 bytes in the order they appear in the key or signature
/// (sig = r || s, as Python `cryptography` produces them); RFC 8032 integers are little-endian, so
/// every input goes through `littleEndian` first.
///
/// Checks, in order: s < L (rejects the malleated s + L); A and R decode canonically (y < p) to
/// points on the curve; A is not of small order (beyond RFC 8032, see hasSmallOrder); then the
/// COFACTORLESS equation [s]B == R + [k]A with k = SHA-512(R || A || message) mod L. RFC 8032
/// allows this or the cofactored [8][s]B == [8]R + [8][k]A; they differ only on signatures built
/// with small-order components, which honest signers (OpenSSL, `cryptography`) never produce.
///
/// Cost choices (~314,000 gas for the registry's 88-byte message): points use extended twisted
/// Edwards coordinates (X:Y:Z:T), x = X/Z, y = Y/Z, xy = T/Z, so additions and doublings need no
/// field inversion; [s]B + [k](-A) is one Straus/Shamir double-scalar loop (the 253 doublings shared
/// by both scalars, 2-bit windows) and its result is compared with R projectively, so the only
/// exponentiations are the two square roots of point decoding, which go to the modexp precompile.
/// The point formulas and the SHA-512 compression are inline assembly: in plain Solidity, checked
/// arithmetic and call overhead made verification cost ~820,000 gas.
library Ed25519 {
    /// Field prime p = 2^255 - 19.
    uint256 private constant P = 0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffed;
    /// Order of the base point, L = 2^252 + 27742317777372353535851937790883648493.
    uint256 private constant L = 0x1000000000000000000000000000000014def9dea2f79cd65812631a5cf5d3ed;
    /// Curve constant d = -121665 / 121666 mod p, and 2d (the addition formula uses 2d).
    uint256 private constant D = 0x52036cee2b6ffe738cc740797779e89800700a4d4141d8ab75eb4dca135978a3;
    uint256 private constant D2 = 0x2406d9dc56dffce7198e80f2eef3d13000e0149a8283b156ebd69b9426b2f159;
    /// sqrt(-1) mod p = 2^((p-1)/4).
    uint256 private constant SQRT_M1 = 0x2b8324804fc1df0b2b4d00993dfbd7a72f431806ad2fe478c4ee1b274a0ea0b0;
    /// (p - 5) / 8: the exponent of the combined inverse-and-square-root in point decoding.
    uint256 private constant SQRT_EXP = 0x0ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffd;
    /// Base point B (RFC 8032 5.1): y = 4/5, x the even root; T = x*y.
    uint256 private constant B_X = 0x216936d3cd6e53fec0a4e231fdd6dc5c692cc7609525a7b2c9562d608f25d51a;
    uint256 private constant B_Y = 0x6666666666666666666666666666666666666666666666666666666666666658;
    /// 2^256 mod L, to fold the high half of the 512-bit challenge hash.
    uint256 private constant TWO_256_MOD_L = 0x0ffffffffffffffffffffffffffffffec6ef5bf4737dcf70d6ec31748d98951d;

    /// SHA-512 round constants K[0..79], 8 bytes each, big-endian (FIPS 180-4, 4.2.3).
    bytes private constant SHA512_K =
        hex"428a2f98d728ae227137449123ef65cdb5c0fbcfec4d3b2fe9b5dba58189dbbc"
        hex"3956c25bf348b53859f111f1b605d019923f82a4af194f9bab1c5ed5da6d8118"
        hex"d807aa98a303024212835b0145706fbe243185be4ee4b28c550c7dc3d5ffb4e2"
        hex"72be5d74f27b896f80deb1fe3b1696b19bdc06a725c71235c19bf174cf692694"
        hex"e49b69c19ef14ad2efbe4786384f25e30fc19dc68b8cd5b5240ca1cc77ac9c65"
        hex"2de92c6f592b02754a7484aa6ea6e4835cb0a9dcbd41fbd476f988da831153b5"
        hex"983e5152ee66dfaba831c66d2db43210b00327c898fb213fbf597fc7beef0ee4"
        hex"c6e00bf33da88fc2d5a79147930aa72506ca6351e003826f142929670a0e6e70"
        hex"27b70a8546d22ffc2e1b21385c26c9264d2c6dfc5ac42aed53380d139d95b3df"
        hex"650a73548baf63de766a0abb3c77b2a881c2c92e47edaee692722c851482353b"
        hex"a2bfe8a14cf10364a81a664bbc423001c24b8b70d0f89791c76c51a30654be30"
        hex"d192e819d6ef5218d69906245565a910f40e35855771202a106aa07032bbd1b8"
        hex"19a4c116b8d2d0c81e376c085141ab532748774cdf8eeb9934b0bcb5e19b48a8"
        hex"391c0cb3c5c95a634ed8aa4ae3418acb5b9cca4f7763e373682e6ff3d6b2b8a3"
        hex"748f82ee5defb2fc78a5636f43172f6084c87814a1f0ab728cc702081a6439ec"
        hex"90befffa23631e28a4506cebde82bde9bef9a3f7b2c67915c67178f2e372532b"
        hex"ca273eceea26619cd186b8c721c0c207eada7dd6cde0eb1ef57d4f7fee6ed178"
        hex"06f067aa72176fba0a637dc5a2c898a6113f9804bef90dae1b710b35131c471b"
        hex"28db77f523047d8432caab7b40c724933c9ebe0a15c9bebc431d67c49c100d4c"
        hex"4cc5d4becb3e42b6597f299cfc657e2a5fcb6fab3ad6faec6c44198c4a475817";

    /// @notice True iff (r, s) is a valid RFC 8032 Ed25519 signature of `message` under `publicKey`.
    function verify(bytes32 publicKey, bytes32 r, bytes32 s, bytes memory message) internal view returns (bool) {
        uint256 sScalar = littleEndian(s);
        if (sScalar >= L) return false;
        (bool ok, uint256 ax, uint256 ay) = decodePoint(publicKey);
        if (!ok || hasSmallOrder(ax, ay)) return false;
        uint256 rx;
        uint256 ry;
        (ok, rx, ry) = decodePoint(r);
        if (!ok) return false;
        uint256 k = challenge(r, publicKey, message);
        // [s]B - [k]A, compared with R = (rx, ry) without leaving projective coordinates.
        (uint256 x, uint256 y, uint256 z) = shamirSBminusKA(sScalar, k, ax, ay);
        return mulmod(rx, z, P) == x && mulmod(ry, z, P) == y;
    }

    // ------------------------------------------------------------------ encodings and scalars

    /// The integer whose little-endian encoding is `b` (byte 0 of b is the least significant).
    function littleEndian(bytes32 b) private pure returns (uint256 v) {
        v = uint256(b);
        v = ((v >> 8) & 0x00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff)
            | ((v & 0x00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff00ff) << 8);
        v = ((v >> 16) & 0x0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff)
            | ((v & 0x0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff0000ffff) << 16);
        v = ((v >> 32) & 0x00000000ffffffff00000000ffffffff00000000ffffffff00000000ffffffff)
            | ((v & 0x00000000ffffffff00000000ffffffff00000000ffffffff00000000ffffffff) << 32);
        v = ((v >> 64) & 0x0000000000000000ffffffffffffffff0000000000000000ffffffffffffffff)
            | ((v & 0x0000000000000000ffffffffffffffff0000000000000000ffffffffffffffff) << 64);
        v = (v >> 128) | (v << 128);
    }

    /// k = SHA-512(R || A || message) read as a little-endian 512-bit integer, reduced mod L.
    function challenge(bytes32 r, bytes32 publicKey, bytes memory message) private pure returns (uint256) {
        (bytes32 first, bytes32 second) = sha512(abi.encodePacked(r, publicKey, message));
        // Digest bytes 0..31 are the low 256 bits, bytes 32..63 the high ones.
        uint256 low = littleEndian(first) % L;
        uint256 high = littleEndian(second);
        return addmod(mulmod(high, TWO_256_MOD_L, L), low, L);
    }

    /// Decode an RFC 8032 point encoding (5.1.3): y in the low 255 bits, the sign (parity) of x in
    /// the top bit. Fails for y >= p (non-canonical), for points off the curve (x^2 has no root) and
    /// for x = 0 with the sign bit set.
    function decodePoint(bytes32 encoded) private view returns (bool ok, uint256 x, uint256 y) {
        uint256 v = littleEndian(encoded);
        uint256 sign = v >> 255;
        y = v & ((1 << 255) - 1);
        if (y >= P) return (false, 0, 0);
        (ok, x) = recoverX(y);
        if (!ok || (x == 0 && sign == 1)) return (false, 0, 0);
        if ((x & 1) != sign) x = P - x;
    }

    /// A root x of x^2 = (y^2 - 1) / (d y^2 + 1), if there is one (which of the two: unspecified).
    /// RFC 8032 5.1.3 step 2: x = u v^3 (u v^7)^((p-5)/8) computes the inverse and the root in one
    /// exponentiation; then v x^2 is u (done), -u (multiply by sqrt(-1)) or neither (no root).
    /// v = d y^2 + 1 is never 0 because d is not a square mod p.
    function recoverX(uint256 y) private view returns (bool ok, uint256 x) {
        uint256 yy = mulmod(y, y, P);
        uint256 u = addmod(yy, P - 1, P);
        uint256 v = addmod(mulmod(D, yy, P), 1, P);
        uint256 v3 = mulmod(mulmod(v, v, P), v, P);
        uint256 v7 = mulmod(mulmod(v3, v3, P), v, P);
        uint256 power;
        (ok, power) = modExpP(mulmod(u, v7, P), SQRT_EXP);
        if (!ok) return (false, 0);
        x = mulmod(mulmod(u, v3, P), power, P);
        uint256 vxx = mulmod(v, mulmod(x, x, P), P);
        if (vxx == u) return (true, x);
        if (vxx == P - u) return (true, mulmod(x, SQRT_M1, P));
        return (false, 0);
    }

    /// base^exponent mod p through the modexp precompile (EIP-198 at 0x05): ~1,300 gas for a 252-bit
    /// exponent, against ~250 squarings and ~125 multiplications in Solidity. ok is false only if the
    /// call itself fails.
    function modExpP(uint256 base, uint256 exponent) private view returns (bool ok, uint256 result) {
        assembly ("memory-safe") {
            // Scratch space past the free-memory pointer: not allocated, only used for this call.
            let input := mload(0x40)
            mstore(input, 0x20) // length of base
            mstore(add(input, 0x20), 0x20) // length of exponent
            mstore(add(input, 0x40), 0x20) // length of modulus
            mstore(add(input, 0x60), base)
            mstore(add(input, 0x80), exponent)
            mstore(add(input, 0xa0), P)
            ok := staticcall(gas(), 0x05, input, 0xc0, input, 0x20)
            result := mload(input)
        }
    }

    // ------------------------------------------------------------------ curve arithmetic
    //
    // -x^2 + y^2 = 1 + d x^2 y^2 over GF(p). Formulas are RFC 8032 5.1.4 (Hisil-Wong-Carter-Dawson,
    // a = -1), which are complete: valid for every pair of curve points, identity and small-order
    // points included, so no special cases are needed for adversarial A or R.
    // A point being added is kept "cached" as [Y - X, Y + X, 2d*T, 2Z], the four factors the addition
    // multiplies by, so each addition costs 8 multiplications instead of 10.
    // Every coordinate is kept reduced (< p), so P - x never underflows: the arithmetic is unchecked.
    // pointAdd and pointDouble, which run ~400 times per verification, are written in assembly.

    /// True for the eight points of order dividing 8 (the identity among them): [8]P is the identity.
    /// Such a public key has no secret behind it, and s = 0 with R = identity "verifies" under it for
    /// every message whose k is a multiple of its order, so a key proof by it would prove nothing.
    /// RFC 8032 does not require this check (libsodium makes it); honest keys [a]B never fail it.
    function hasSmallOrder(uint256 x, uint256 y) private pure returns (bool) {
        uint256 z = 1;
        (x, y, z,) = pointDouble(x, y, z);
        (x, y, z,) = pointDouble(x, y, z);
        (x, y, z,) = pointDouble(x, y, z);
        return x == 0 && y == z;
    }

    /// [s]B + [k](-A) in projective (X : Y : Z), by Straus/Shamir with 2-bit windows: one pass over
    /// both scalars from the top, two bits of each at a time, so the doublings are shared and each
    /// window costs at most one addition, of [i]B + [j](-A) from a table (i, j: the window of s, k).
    /// Both scalars are < L < 2^253, so 127 windows cover them.
    function shamirSBminusKA(uint256 s, uint256 k, uint256 ax, uint256 ay)
        private
        pure
        returns (uint256 x, uint256 y, uint256 z)
    {
        uint256[64] memory addend = addendTable(ax, ay);
        uint256 t;
        (x, y, z, t) = (0, 1, 1, 0); // identity
        unchecked {
            for (uint256 i = 254; i > 0;) {
                i -= 2;
                (x, y, z, t) = pointDouble(x, y, z);
                (x, y, z, t) = pointDouble(x, y, z);
                uint256 window = ((s >> i) & 3) | (((k >> i) & 3) << 2);
                if (window != 0) (x, y, z, t) = pointAdd(x, y, z, t, addend, window);
            }
        }
    }

    /// Entry i + 4j of the table is [i]B + [j](-A), cached, for i, j in 0..3 (entry 0, the identity,
    /// is unused): row 0 holds the multiples of B, row j each of them plus [j](-A).
    function addendTable(uint256 ax, uint256 ay) private pure returns (uint256[64] memory table) {
        storeCached(table, 1, B_X, B_Y, 1, mulmod(B_X, B_Y, P));
        (uint256 x, uint256 y, uint256 z, uint256 t) = pointDouble(B_X, B_Y, 1);
        storeCached(table, 2, x, y, z, t);
        (x, y, z, t) = pointAdd(x, y, z, t, table, 1);
        storeCached(table, 3, x, y, z, t);
        uint256 negAx = (P - ax) % P;
        fillRow(table, 1, negAx, ay, 1, mulmod(negAx, ay, P));
        (x, y, z, t) = pointDouble(negAx, ay, 1);
        fillRow(table, 2, x, y, z, t);
        (x, y, z, t) = pointAdd(x, y, z, t, table, 4);
        fillRow(table, 3, x, y, z, t);
    }

    /// Row j of the table from the extended point (x : y : z : t) = [j](-A), row 0 being filled.
    function fillRow(uint256[64] memory table, uint256 j, uint256 x, uint256 y, uint256 z, uint256 t)
        private
        pure
    {
        storeCached(table, 4 * j, x, y, z, t);
        for (uint256 i = 1; i < 4; ++i) {
            storeCachedSum(table, i + 4 * j, x, y, z, t, i);
        }
    }

    /// Store (x : y : z : t) + table entry `other` as table entry `index`.
    function storeCachedSum(
        uint256[64] memory table,
        uint256 index,
        uint256 x,
        uint256 y,
        uint256 z,
        uint256 t,
        uint256 other
    ) private pure {
        (x, y, z, t) = pointAdd(x, y, z, t, table, other);
        storeCached(table, index, x, y, z, t);
    }

    /// Store the extended point (x : y : z : t) as table entry `index`, in the cached form
    /// [Y - X, Y + X, 2d*T, 2Z]. Entries are 4 words (128 bytes) at table + 128 * index.
    function storeCached(uint256[64] memory table, uint256 index, uint256 x, uint256 y, uint256 z, uint256 t)
        private
        pure
    {
        unchecked {
            uint256 o = 4 * index;
            (table[o], table[o + 1], table[o + 2], table[o + 3]) =
                (addmod(y, P - x, P), addmod(y, x, P), mulmod(D2, t, P), addmod(z, z, P));
        }
    }

    /// (x1 : y1 : z1 : t1) + table entry `index` (< 16, cached): RFC 8032 5.1.4 addition.
    function pointAdd(uint256 x1, uint256 y1, uint256 z1, uint256 t1, uint256[64] memory table, uint256 index)
        private
        pure
        returns (uint256 x3, uint256 y3, uint256 z3, uint256 t3)
    {
        assembly ("memory-safe") {
            let p := P
            let q := add(table, shl(7, index))
            let a := mulmod(addmod(y1, sub(p, x1), p), mload(q), p) // A = (Y1 - X1) (Y2 - X2)
            let b := mulmod(addmod(y1, x1, p), mload(add(q, 0x20)), p) // B = (Y1 + X1) (Y2 + X2)
            let c := mulmod(t1, mload(add(q, 0x40)), p) // C = T1 2d T2
            let d := mulmod(z1, mload(add(q, 0x60)), p) // D = Z1 2 Z2
            let e := addmod(b, sub(p, a), p)
            let f := addmod(d, sub(p, c), p)
            let g := addmod(d, c, p)
            let h := addmod(b, a, p)
            x3 := mulmod(e, f, p)
            y3 := mulmod(g, h, p)
            z3 := mulmod(f, g, p)
            t3 := mulmod(e, h, p)
        }
    }

    /// 2 * (x1 : y1 : z1) (RFC 8032 5.1.4 doubling), which needs no T1 but returns T3 for an addition.
    function pointDouble(uint256 x1, uint256 y1, uint256 z1)
        private
        pure
        returns (uint256 x3, uint256 y3, uint256 z3, uint256 t3)
    {
        assembly ("memory-safe") {
            let p := P
            let a := mulmod(x1, x1, p)
            let b := mulmod(y1, y1, p)
            let c := mulmod(z1, z1, p)
            c := addmod(c, c, p) // C = 2 Z1^2
            let h := addmod(a, b, p) // H = A + B
            let xy := addmod(x1, y1, p)
            let e := addmod(h, sub(p, mulmod(xy, xy, p)), p) // E = H - (X1 + Y1)^2
            let g := addmod(a, sub(p, b), p) // G = A - B
            let f := addmod(c, g, p) // F = C + G
            x3 := mulmod(e, f, p)
            y3 := mulmod(g, h, p)
            z3 := mulmod(f, g, p)
            t3 := mulmod(e, h, p)
        }
    }

    // ------------------------------------------------------------------ SHA-512 (FIPS 180-4)
    //
    // The EVM has no 64-bit arithmetic: 64-bit words live in uint256 and are masked back to 64 bits
    // after each sum or rotation. The eight working variables are packed four to a word,
    // abcd = a|b|c|d and efgh = e|f|g|h with a and e in the top 64 bits: a round then shifts each
    // pack down one lane and puts the new a / e on top, so the state stays on the stack.

    uint256 private constant LANES_1_3 = 0x0000000000000000ffffffffffffffff0000000000000000ffffffffffffffff;
    uint256 private constant LANES_0_2 = 0xffffffffffffffff0000000000000000ffffffffffffffff0000000000000000;

    /// SHA-512 of `data`, as the two 32-byte halves of the digest in byte order.
    function sha512(bytes memory data) private pure returns (bytes32, bytes32) {
        // Padding (5.1.2): 0x80, zeros up to 112 mod 128, then the bit length as 128 bits big-endian.
        uint256 zeros = (128 - ((data.length + 17) % 128)) % 128;
        bytes memory padded = abi.encodePacked(data, bytes1(0x80), new bytes(zeros), uint128(data.length * 8));
        // H0..H7 (5.3.5), packed like the working variables, which is also the digest's byte order.
        uint256 abcd = 0x6a09e667f3bcc908bb67ae8584caa73b3c6ef372fe94f82ba54ff53a5f1d36f1;
        uint256 efgh = 0x510e527fade682d19b05688c2b3e6c1f1f83d9abfb41bd6b5be0cd19137e2179;
        bytes memory roundConstants = SHA512_K; // copied to memory once per hash, not per round
        uint256[80] memory w; // message schedule, reused by every block
        for (uint256 offset = 0; offset < padded.length; offset += 128) {
            (uint256 x, uint256 y) = compress(abcd, efgh, padded, offset, w, roundConstants);
            abcd = addLanes(abcd, x);
            efgh = addLanes(efgh, y);
        }
        return (bytes32(abcd), bytes32(efgh));
    }

    /// The working variables after the 80 rounds on the 128-byte block at `offset` of `padded`
    /// (6.4.2 steps 1-3); w is scratch for the message schedule, k the round constants.
    /// Assembly because the hash runs 80 rounds per block: in Solidity, function-call and
    /// checked-arithmetic overhead made one block cost ~200,000 gas.
    function compress(
        uint256 abcd,
        uint256 efgh,
        bytes memory padded,
        uint256 offset,
        uint256[80] memory w,
        bytes memory k
    ) private pure returns (uint256, uint256) {
        assembly ("memory-safe") {
            // 64-bit rotations right by n are written or(shr(n, x), shl(64 - n, x)); the bits that
            // shl pushes above bit 63 are cleared by one mask per sigma. They are written out rather
            // than as Yul helper functions, which the legacy pipeline does not inline (a call per
            // rotation cost more than the rotation), and scoped in blocks to fit the stack.

            // Step 1: W[0..15] are the block's big-endian 64-bit words; for t >= 16
            // W[t] = sigma1(W[t-2]) + W[t-7] + sigma0(W[t-15]) + W[t-16].
            offset := add(add(padded, 0x20), offset) // the block's first byte
            for { let t := 0 } lt(t, 16) { t := add(t, 1) } {
                mstore(add(w, shl(5, t)), shr(192, mload(add(offset, shl(3, t)))))
            }
            for { let wt := add(w, 0x200) } lt(wt, add(w, 0xa00)) { wt := add(wt, 0x20) } {
                let x := mload(sub(wt, 0x40)) // W[t-2]
                let sum := xor(xor(or(shr(19, x), shl(45, x)), or(shr(61, x), shl(3, x))), shr(6, x))
                x := mload(sub(wt, 0x1e0)) // W[t-15]
                sum := add(and(sum, 0xffffffffffffffff),
                           and(xor(xor(or(shr(1, x), shl(63, x)), or(shr(8, x), shl(56, x))), shr(7, x)),
                               0xffffffffffffffff))
                mstore(wt, and(add(sum, add(mload(sub(wt, 0xe0)), mload(sub(wt, 0x200)))), 0xffffffffffffffff))
            }

            // Step 3: the rounds. Each shifts both packs down one lane and puts the new e / a on top;
            // shl(192, .) keeps only the low 64 bits of the sum, which is the reduction mod 2^64.
            k := add(k, 0x20) // the first round constant
            for { let t := 0 } lt(t, 80) { t := add(t, 1) } {
                // T1 = h + SIGMA1(e) + Ch(e, f, g) + K[t] + W[t]
                let t1 := add(and(efgh, 0xffffffffffffffff),
                              add(shr(192, mload(add(k, shl(3, t)))), mload(add(w, shl(5, t)))))
                {
                    let e := shr(192, efgh)
                    t1 := add(t1, and(xor(xor(or(shr(14, e), shl(50, e)), or(shr(18, e), shl(46, e))),
                                          or(shr(41, e), shl(23, e))), 0xffffffffffffffff))
                }
                // Ch(e, f, g) = (e AND f) XOR (NOT e AND g): shifting efgh left one or two lanes
                // brings f or g to the top, next to e.
                t1 := add(t1, shr(192, xor(and(efgh, shl(64, efgh)), and(not(efgh), shl(128, efgh)))))
                // T2 = SIGMA0(a) + Maj(a, b, c), Maj = (a AND b) XOR (a AND c) XOR (b AND c), the same way
                let t2
                {
                    let a := shr(192, abcd)
                    t2 := and(xor(xor(or(shr(28, a), shl(36, a)), or(shr(34, a), shl(30, a))),
                                  or(shr(39, a), shl(25, a))), 0xffffffffffffffff)
                }
                {
                    let b := shl(64, abcd)
                    let c := shl(128, abcd)
                    t2 := add(t2, shr(192, xor(xor(and(abcd, b), and(abcd, c)), and(b, c))))
                }
                // e' = d + T1, f' = e, g' = f, h' = g;  a' = T1 + T2, b' = a, c' = b, d' = c
                efgh := or(shl(192, add(and(abcd, 0xffffffffffffffff), t1)), shr(64, efgh))
                abcd := or(shl(192, add(t1, t2)), shr(64, abcd))
            }
        }
        return (abcd, efgh);
    }

    /// Lane-wise x + y mod 2^64 over four packed words: alternate lanes are summed apart so that a
    /// carry out of one lane lands in an empty one and is masked off.
    function addLanes(uint256 x, uint256 y) private pure returns (uint256) {
        unchecked {
            uint256 odd = ((x & LANES_1_3) + (y & LANES_1_3)) & LANES_1_3;
            uint256 even = ((x & LANES_0_2) + (y & LANES_0_2)) & LANES_0_2;
            return odd | even;
        }
    }
}
