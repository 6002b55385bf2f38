//! Webhook signature verification (`x-fenx-signature`): the candidate recipes and the pure
//! `verify` function over the exact raw body bytes.
//!
//! Fenergo documents only that the configured secret is SHA-256-hashed and that the signature is
//! an HMAC over that hash and the full body; the key encoding and digest encoding are unconfirmed
//! (see `../shared/fenergo-contract.md` §1). So every plausible recipe is modelled and the operator
//! either accepts any of them (`auto`) or pins one once a live delivery has shown which is real.
//!
//! This module must never do I/O, log secrets, or compare digests in variable time.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};

/// The HTTP header Fenergo puts the signature in.
pub const HEADER: &str = "x-fenx-signature";

/// Length in bytes of an HMAC-SHA256 digest.
const DIGEST_LEN: usize = 32;

/// How the HMAC key is derived from the secret the operator configured in Fenergo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyDerivation {
    /// The plaintext secret bytes themselves (the GitHub-style scheme).
    Secret,
    /// The 32 raw bytes of SHA-256(secret).
    Sha256Bytes,
    /// SHA-256(secret) as a lower-case hex string.
    Sha256Hex,
    /// SHA-256(secret) as an upper-case hex string.
    Sha256HexUpper,
    /// SHA-256(secret) as a standard, padded base64 string.
    Sha256Base64,
}

impl KeyDerivation {
    pub const ALL: [KeyDerivation; 5] = [
        KeyDerivation::Secret,
        KeyDerivation::Sha256Bytes,
        KeyDerivation::Sha256Hex,
        KeyDerivation::Sha256HexUpper,
        KeyDerivation::Sha256Base64,
    ];

    fn name(self) -> &'static str {
        match self {
            KeyDerivation::Secret => "secret",
            KeyDerivation::Sha256Bytes => "sha256-bytes",
            KeyDerivation::Sha256Hex => "sha256-hex",
            KeyDerivation::Sha256HexUpper => "sha256-hex-upper",
            KeyDerivation::Sha256Base64 => "sha256-base64",
        }
    }

    fn derive(self, secret: &str) -> Vec<u8> {
        let hashed = Sha256::digest(secret.as_bytes());
        match self {
            KeyDerivation::Secret => secret.as_bytes().to_vec(),
            KeyDerivation::Sha256Bytes => hashed.to_vec(),
            KeyDerivation::Sha256Hex => hex::encode(hashed).into_bytes(),
            KeyDerivation::Sha256HexUpper => hex::encode_upper(hashed).into_bytes(),
            KeyDerivation::Sha256Base64 => STANDARD.encode(hashed).into_bytes(),
        }
    }
}

/// How the digest is written in the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DigestEncoding {
    /// Hex, compared case-insensitively.
    Hex,
    /// Base64 (standard or URL-safe, padded or not).
    Base64,
}

impl DigestEncoding {
    pub const ALL: [DigestEncoding; 2] = [DigestEncoding::Hex, DigestEncoding::Base64];

    fn name(self) -> &'static str {
        match self {
            DigestEncoding::Hex => "hex",
            DigestEncoding::Base64 => "base64",
        }
    }
}

/// One candidate signing scheme, named `<key>/<digest>`, e.g. `sha256-hex/base64`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Recipe {
    pub key: KeyDerivation,
    pub digest: DigestEncoding,
}

impl Recipe {
    /// Every candidate, in the order `auto` tries them.
    pub fn all() -> impl Iterator<Item = Recipe> {
        KeyDerivation::ALL.into_iter().flat_map(|key| {
            DigestEncoding::ALL
                .into_iter()
                .map(move |digest| Recipe { key, digest })
        })
    }

    /// The header value this recipe produces for `body` (without a `sha256=` prefix).
    pub fn sign(self, secret: &str, body: &[u8]) -> String {
        let mut mac = new_mac(&self.key.derive(secret));
        mac.update(body);
        let digest = mac.finalize().into_bytes();
        match self.digest {
            DigestEncoding::Hex => hex::encode(digest),
            DigestEncoding::Base64 => STANDARD.encode(digest),
        }
    }
}

impl fmt::Display for Recipe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.key.name(), self.digest.name())
    }
}

/// Serialised by name, as `Display` writes it.
impl serde::Serialize for Recipe {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl FromStr for Recipe {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Recipe::all()
            .find(|r| r.to_string().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| {
                let names: Vec<String> = Recipe::all().map(|r| r.to_string()).collect();
                format!(
                    "unknown signature recipe {s:?}; expected \"auto\" or one of {}",
                    names.join(", ")
                )
            })
    }
}

/// Which recipes the verifier accepts: any candidate, or exactly one pinned recipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RecipeChoice {
    #[default]
    Auto,
    Pinned(Recipe),
}

impl fmt::Display for RecipeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecipeChoice::Auto => f.write_str("auto"),
            RecipeChoice::Pinned(r) => r.fmt(f),
        }
    }
}

impl FromStr for RecipeChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("auto") {
            Ok(RecipeChoice::Auto)
        } else {
            s.parse().map(RecipeChoice::Pinned)
        }
    }
}

/// Why a signature was rejected. Every variant means 401; the reason goes to logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing x-fenx-signature header")]
    Missing,
    #[error("empty x-fenx-signature header")]
    Empty,
    #[error("x-fenx-signature is not a hex or base64 HMAC-SHA256 digest")]
    Malformed,
    #[error("x-fenx-signature does not match the body")]
    Mismatch,
    #[error("more than one x-fenx-signature header")]
    Repeated,
}

impl SignatureError {
    /// A stable label for logs and metrics.
    pub fn reason(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing",
            SignatureError::Empty => "empty",
            SignatureError::Malformed => "malformed",
            SignatureError::Mismatch => "mismatch",
            SignatureError::Repeated => "repeated",
        }
    }
}

/// The one `x-fenx-signature` value among all the request's `values` of that header, if any.
/// Two or more are refused whatever they say: checking only one of them would let a forged
/// header decide the outcome by its position.
pub fn single_header<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<&'a [u8]>, SignatureError> {
    let first = values.next();
    match values.next() {
        Some(_) => Err(SignatureError::Repeated),
        None => Ok(first),
    }
}

/// Which recipe and which configured secret (0-based, in configuration order) matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub recipe: Recipe,
    pub secret_index: usize,
}

/// Verifies signatures against every configured secret (several during rotation).
///
/// Keys are derived and keyed into an HMAC once at start-up, so a request costs only hashing its
/// body; and the key that matched last is tried first, so in `auto` mode a steady stream of
/// deliveries costs one HMAC each, not one per candidate recipe before the right one.
pub struct Verifier {
    choice: RecipeChoice,
    /// `(secret index, key derivation, keyed HMAC)` for every key the choice allows.
    keys: Vec<(usize, KeyDerivation, Hmac<Sha256>)>,
    /// Index into `keys` of the last match.
    last_match: AtomicUsize,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Verifier")
            .field("choice", &self.choice)
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl Verifier {
    pub fn new(secrets: &[SecretString], choice: RecipeChoice) -> Verifier {
        let derivations: Vec<KeyDerivation> = match choice {
            RecipeChoice::Auto => KeyDerivation::ALL.to_vec(),
            RecipeChoice::Pinned(r) => vec![r.key],
        };
        let keys = secrets
            .iter()
            .enumerate()
            .flat_map(|(index, secret)| {
                derivations
                    .iter()
                    .map(move |&d| (index, d, new_mac(&d.derive(secret.expose_secret()))))
            })
            .collect();
        Verifier {
            choice,
            keys,
            last_match: AtomicUsize::new(0),
        }
    }

    /// Checks `header` (the raw `x-fenx-signature` value, if any) against the exact body bytes.
    pub fn verify(&self, header: Option<&[u8]>, body: &[u8]) -> Result<Verified, SignatureError> {
        let header = header.ok_or(SignatureError::Missing)?;
        let value = std::str::from_utf8(header)
            .map_err(|_| SignatureError::Malformed)?
            .trim();
        let value = strip_prefix_ignore_case(value, "sha256=").trim();
        if value.is_empty() {
            return Err(SignatureError::Empty);
        }
        let (digest, encoding) = decode_digest(value).ok_or(SignatureError::Malformed)?;
        if let RecipeChoice::Pinned(r) = self.choice
            && r.digest != encoding
        {
            return Err(SignatureError::Mismatch);
        }
        let first = self.last_match.load(Ordering::Relaxed);
        let count = self.keys.len();
        (0..count)
            .map(|offset| (first + offset) % count)
            .find(|&i| {
                let mut mac = self.keys[i].2.clone();
                mac.update(body);
                mac.verify_slice(&digest).is_ok()
            })
            .map(|i| {
                self.last_match.store(i, Ordering::Relaxed);
                &self.keys[i]
            })
            .map(|&(secret_index, key, _)| Verified {
                recipe: Recipe {
                    key,
                    digest: encoding,
                },
                secret_index,
            })
            .ok_or(SignatureError::Mismatch)
    }
}

/// Every recipe under which `signature` matches `body` for `secret` (for `signature detect`).
pub fn detect(secret: &str, body: &[u8], signature: &str) -> Vec<Recipe> {
    let secret = SecretString::from(secret.to_owned());
    Recipe::all()
        .filter(|&r| {
            Verifier::new(std::slice::from_ref(&secret), RecipeChoice::Pinned(r))
                .verify(Some(signature.as_bytes()), body)
                .is_ok()
        })
        .collect()
}

fn new_mac(key: &[u8]) -> Hmac<Sha256> {
    <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn strip_prefix_ignore_case<'a>(value: &'a str, prefix: &str) -> &'a str {
    match value.get(..prefix.len()) {
        Some(head) if head.eq_ignore_ascii_case(prefix) => &value[prefix.len()..],
        _ => value,
    }
}

/// Decodes a digest written as 64 hex digits (any case) or as base64 of exactly 32 bytes.
/// A hex digest is never valid base64 of 32 bytes (64 characters decode to 48), so the shape
/// alone tells the encoding.
fn decode_digest(value: &str) -> Option<(Vec<u8>, DigestEncoding)> {
    if value.len() == DIGEST_LEN * 2 {
        return hex::decode(value).ok().map(|d| (d, DigestEncoding::Hex));
    }
    [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD]
        .iter()
        .find_map(|engine| engine.decode(value).ok())
        .filter(|d| d.len() == DIGEST_LEN)
        .map(|d| (d, DigestEncoding::Base64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "secret";
    const BODY: &[u8] =
        br#"{"Id":"09916cea-78b8-524c-a6ad-bd7397bcd4e6","EventType":"entitydata:created"}"#;

    /// The candidate table from `fenergo-contract.md` §1 (computed independently, not by us).
    const CONTRACT_VECTORS: [(&str, &str, &str); 5] = [
        (
            "secret",
            "68bc57d4aadda4dffeb0ce5cee155e57d79030df41c7c996adb39b110fb47706",
            "aLxX1KrdpN/+sM5c7hVeV9eQMN9Bx8mWrbObEQ+0dwY=",
        ),
        (
            "sha256-bytes",
            "ffd47876d4b271760b306c0ab26640d2f6807618e0dc2b129bfcc328833af971",
            "/9R4dtSycXYLMGwKsmZA0vaAdhjg3CsSm/zDKIM6+XE=",
        ),
        (
            "sha256-hex",
            "9cd720da98be240a5d61ac8e5ecafad89e37c3c561c32bec3280579d8c6a5195",
            "nNcg2pi+JApdYayOXsr62J43w8VhwyvsMoBXnYxqUZU=",
        ),
        (
            "sha256-hex-upper",
            "237f1142f09603819a110f7090eec9268c2af1090a7a8057abe8daf228ffd5a6",
            "I38RQvCWA4GaEQ9wkO7JJowq8QkKeoBXq+ja8ij/1aY=",
        ),
        (
            "sha256-base64",
            "354809725f275aa326a0b66890d3bcabb206cac1079f3e4236bbdd8866f41b07",
            "NUgJcl8nWqMmoLZokNO8q7IGysEHnz5CNrvdiGb0Gwc=",
        ),
    ];

    fn verifier(secrets: &[&str], choice: &str) -> Verifier {
        let secrets: Vec<SecretString> = secrets.iter().map(|s| (*s).into()).collect();
        Verifier::new(&secrets, choice.parse().unwrap())
    }

    fn check(v: &Verifier, header: &str) -> Result<String, SignatureError> {
        v.verify(Some(header.as_bytes()), BODY)
            .map(|ok| ok.recipe.to_string())
    }

    #[test]
    fn contract_vectors_match_their_recipe_and_only_it() {
        let auto = verifier(&[SECRET], "auto");
        for (key, hex_digest, b64_digest) in CONTRACT_VECTORS {
            for (digest, encoding) in [(hex_digest, "hex"), (b64_digest, "base64")] {
                let name = format!("{key}/{encoding}");
                assert_eq!(check(&auto, digest).as_deref(), Ok(name.as_str()));
                assert_eq!(check(&verifier(&[SECRET], &name), digest), Ok(name.clone()));
                for other in Recipe::all().filter(|r| r.to_string() != name) {
                    let pinned = verifier(&[SECRET], &other.to_string());
                    assert_eq!(check(&pinned, digest), Err(SignatureError::Mismatch));
                }
            }
            assert_eq!(
                Recipe::from_str(&format!("{key}/hex"))
                    .unwrap()
                    .sign(SECRET, BODY),
                hex_digest
            );
        }
    }

    #[test]
    fn sha256_of_secret_matches_the_contract() {
        assert_eq!(
            hex::encode(Sha256::digest(SECRET)),
            "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"
        );
    }

    #[test]
    fn github_published_example_verifies_as_plain_secret_hex() {
        // docs.github.com "Validating webhook deliveries": an outside check of the HMAC code.
        let v = verifier(&["It's a Secret to Everybody"], "auto");
        let header = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let got = v.verify(Some(header.as_bytes()), b"Hello, World!").unwrap();
        assert_eq!(got.recipe.to_string(), "secret/hex");
    }

    #[test]
    fn prefix_case_and_padding_variants_are_accepted() {
        let auto = verifier(&[SECRET], "auto");
        let (_, hex_digest, b64) = CONTRACT_VECTORS[2];
        for header in [
            hex_digest.to_string(),
            hex_digest.to_uppercase(),
            format!("sha256={hex_digest}"),
            format!("SHA256={}", hex_digest.to_uppercase()),
            format!("  sha256= {hex_digest} "),
            b64.trim_end_matches('=').to_string(),
            b64.replace('+', "-").replace('/', "_"),
            format!("sha256={b64}"),
        ] {
            assert!(check(&auto, &header).is_ok(), "rejected {header:?}");
        }
    }

    #[test]
    fn rotation_accepts_any_configured_secret_and_says_which() {
        let v = verifier(&["old-secret", "new-secret"], "auto");
        let recipe: Recipe = "sha256-hex/hex".parse().unwrap();
        for (index, secret) in ["old-secret", "new-secret"].into_iter().enumerate() {
            let header = recipe.sign(secret, BODY);
            let ok = v.verify(Some(header.as_bytes()), BODY).unwrap();
            assert_eq!((ok.recipe, ok.secret_index), (recipe, index));
        }
        let stranger = recipe.sign("someone-else", BODY);
        assert_eq!(check(&v, &stranger), Err(SignatureError::Mismatch));
    }

    #[test]
    fn bad_signatures_are_rejected_with_a_reason_and_never_panic() {
        let v = verifier(&[SECRET], "auto");
        let good = CONTRACT_VECTORS[1].1;
        assert_eq!(v.verify(None, BODY), Err(SignatureError::Missing));
        for (header, want) in [
            ("", SignatureError::Empty),
            ("   ", SignatureError::Empty),
            ("sha256=", SignatureError::Empty),
            (&good[..63], SignatureError::Malformed),
            (&good[..32], SignatureError::Malformed),
            (&format!("{good}00"), SignatureError::Malformed),
            (&good.replace('f', "g"), SignatureError::Malformed),
            ("not a signature at all!", SignatureError::Malformed),
            ("sha256=é", SignatureError::Malformed),
            (&"0".repeat(64), SignatureError::Mismatch),
            (&"A".repeat(10_000), SignatureError::Malformed),
        ] {
            assert_eq!(check(&v, header), Err(want), "header {header:?}");
        }
        assert_eq!(
            v.verify(Some(&[0xff, 0xfe, 0x00]), BODY),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn arbitrary_headers_never_panic_and_never_verify() {
        let v = verifier(&[SECRET, "second"], "auto");
        let mut rng = fastrand::Rng::with_seed(11);
        let alphabet = b"0123456789abcdefABCDEF+/=-_ sha256=\xff\x00";
        for _ in 0..20_000 {
            let header: Vec<u8> = (0..rng.usize(0..100))
                .map(|_| alphabet[rng.usize(..alphabet.len())])
                .collect();
            assert!(v.verify(Some(&header), BODY).is_err(), "{header:?}");
        }
    }

    #[test]
    fn only_a_single_header_value_is_taken() {
        let (good, bad): (&[u8], &[u8]) = (b"good", b"bad");
        assert_eq!(single_header(std::iter::empty()), Ok(None));
        assert_eq!(single_header([good].into_iter()), Ok(Some(good)));
        for pair in [[good, bad], [bad, good], [good, good]] {
            assert_eq!(
                single_header(pair.into_iter()),
                Err(SignatureError::Repeated)
            );
        }
    }

    #[test]
    fn a_changed_body_byte_breaks_the_signature() {
        let v = verifier(&[SECRET], "auto");
        let header = CONTRACT_VECTORS[0].1;
        let mut body = BODY.to_vec();
        body.push(b'\n');
        assert_eq!(
            v.verify(Some(header.as_bytes()), &body),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn pinned_recipe_rejects_the_other_encoding() {
        let v = verifier(&[SECRET], "sha256-bytes/hex");
        assert_eq!(
            check(&v, CONTRACT_VECTORS[1].2),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn detect_names_every_matching_recipe() {
        let found = detect(SECRET, BODY, CONTRACT_VECTORS[4].2);
        assert_eq!(found, vec!["sha256-base64/base64".parse().unwrap()]);
        assert!(detect(SECRET, BODY, "nope").is_empty());
    }

    #[test]
    fn recipe_names_round_trip_and_unknown_names_list_the_valid_ones() {
        for r in Recipe::all() {
            assert_eq!(r.to_string().parse::<Recipe>(), Ok(r));
        }
        assert_eq!("AUTO".parse::<RecipeChoice>(), Ok(RecipeChoice::Auto));
        let err = "md5/hex".parse::<RecipeChoice>().unwrap_err();
        assert!(err.contains("sha256-hex-upper/base64"), "{err}");
    }
}
