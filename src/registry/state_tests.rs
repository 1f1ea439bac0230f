//! Table-by-table tests of the state machine's rules.

use super::*;
use crate::identity::KeyState;
use crate::registry::{EndCause, SessionEnd};

const T0: u64 = 1_700_000_000;
const DAY: u64 = 86_400;

/// A state machine fed by a fake log: every command gets the next index.
struct Log {
    sm: RegistryState,
    next: u64,
}

impl Log {
    fn new() -> Self {
        let mut log = Log {
            sm: RegistryState::default(),
            next: 1,
        };
        log.ok(
            T0,
            Op::InitKeyring {
                secret: Secret::new(vec![1; 32]),
            },
        );
        log
    }

    fn apply(&mut self, at: u64, op: Op) -> Response {
        let index = self.next;
        self.next += 1;
        self.sm.apply(index, &Command { at, op })
    }

    fn ok(&mut self, at: u64, op: Op) -> Outcome {
        self.apply(at, op).expect("command refused")
    }

    /// Applies a command that must be refused, and checks the tables did not change.
    fn refused(&mut self, at: u64, op: Op) -> RegistryError {
        let before = self.sm.tables().clone();
        let err = self.apply(at, op).expect_err("command accepted");
        assert_eq!(
            self.sm.tables(),
            &before,
            "a refused command changed the tables"
        );
        err
    }

    fn claim(&mut self, at: u64, id: &str) -> Certificate {
        match self.ok(at, claim_op(id, false, None, None)) {
            Outcome::Claimed { certificate } => certificate,
            o => panic!("{o:?}"),
        }
    }

    fn revoke(&mut self, at: u64, cert: Certificate) -> Outcome {
        self.ok(
            at,
            Op::RevokeCertificate {
                certificate: cert,
                by: None,
            },
        )
    }

    fn register(
        &mut self,
        at: u64,
        id: &str,
        conn: ConnRef,
        cert: Option<&Certificate>,
    ) -> Response {
        self.apply(at, register_op(id, conn, cert, false, false))
    }
}

fn claim_op(id: &str, force: bool, proof: Option<&Certificate>, conn: Option<ConnRef>) -> Op {
    Op::Claim(ClaimArgs {
        agent_id: id.into(),
        ttl_secs: DAY,
        force,
        proof: proof.cloned(),
        conn,
    })
}

fn register_op(
    id: &str,
    conn: ConnRef,
    cert: Option<&Certificate>,
    force: bool,
    allow: bool,
) -> Op {
    Op::Register {
        agent_id: id.into(),
        conn,
        metadata: "{}".into(),
        certificate: cert.cloned(),
        force_reconnect: force,
        allow_uncertified_takeover: allow,
    }
}

fn conn(node_id: u64, conn_id: u64) -> ConnRef {
    ConnRef { node_id, conn_id }
}

// ---- claims ----

#[test]
fn first_claim_wins_and_issues_a_valid_certificate() {
    let mut log = Log::new();
    let cert = log.claim(T0, "a");
    assert_eq!(cert.agent_id, "a");
    assert_eq!(
        cert.serial, 2,
        "alone in its entry, a claim's serial is its log index"
    );
    assert_eq!((cert.issued_at, cert.expires_at), (T0, T0 + DAY));
    log.sm.validate(&cert, T0 + 1).unwrap();
    let claim = log.sm.claim("a").unwrap();
    assert_eq!(claim.serial, cert.serial);
    assert_eq!(claim.certificate_hash, cert.certificate_hash);
    assert_eq!(
        log.refused(T0 + 1, claim_op("a", false, None, None)),
        RegistryError::AlreadyClaimed {
            agent_id: "a".into()
        }
    );
}

#[test]
fn force_needs_a_valid_certificate_for_the_same_id() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let b = log.claim(T0, "b");
    assert_eq!(
        log.refused(T0, claim_op("a", true, None, None)),
        RegistryError::ForceWithoutProof {
            agent_id: "a".into()
        }
    );
    assert_eq!(
        log.refused(T0, claim_op("a", true, Some(&b), None)),
        RegistryError::Certificate(Invalid::OtherAgent)
    );
    let mut forged = a.clone();
    forged.expires_at += 1;
    assert_eq!(
        log.refused(T0, claim_op("a", true, Some(&forged), None)),
        RegistryError::Certificate(Invalid::BadSignature)
    );
    let Outcome::Claimed { certificate: a2 } = log.ok(T0 + 5, claim_op("a", true, Some(&a), None))
    else {
        panic!()
    };
    assert!(a2.serial > a.serial);
    log.sm.validate(&a2, T0 + 6).unwrap();
    assert_eq!(log.sm.validate(&a, T0 + 6), Err(Invalid::Superseded));
}

#[test]
fn a_bad_proof_is_refused_even_for_a_free_id() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let mut forged = a.clone();
    forged.agent_id = "free".into();
    assert_eq!(
        log.refused(T0, claim_op("free", true, Some(&forged), None)),
        RegistryError::Certificate(Invalid::BadSignature)
    );
    // An expired certificate of a lapsed claim: claim without it instead.
    assert_eq!(
        log.refused(T0 + DAY, claim_op("a", false, Some(&a), None)),
        RegistryError::Certificate(Invalid::Expired)
    );
    log.ok(T0 + DAY, claim_op("a", false, None, None));
}

#[test]
fn an_expired_claim_is_free_to_claim_again() {
    let mut log = Log::new();
    let old = log.claim(T0, "a");
    let new = log.claim(T0 + DAY, "a");
    assert!(new.serial > old.serial);
    assert_eq!(log.sm.validate(&old, T0 + DAY), Err(Invalid::Expired));
    log.sm.validate(&new, T0 + DAY).unwrap();
}

#[test]
fn a_live_session_on_another_connection_blocks_a_claim() {
    let mut log = Log::new();
    log.register(T0, "legacy", conn(1, 1), None).unwrap();
    assert_eq!(
        log.refused(T0, claim_op("legacy", false, None, Some(conn(2, 9)))),
        RegistryError::AlreadyConnected {
            agent_id: "legacy".into(),
            node_id: 1
        }
    );
    assert_eq!(
        log.refused(T0, claim_op("legacy", false, None, None)),
        RegistryError::AlreadyConnected {
            agent_id: "legacy".into(),
            node_id: 1
        }
    );
    // The connection that holds the session may claim it.
    log.ok(T0, claim_op("legacy", false, None, Some(conn(1, 1))));
}

#[test]
fn claims_refuse_bad_ids_and_ttls_and_need_a_key() {
    let mut log = Log::new();
    assert!(matches!(
        log.refused(T0, claim_op("", false, None, None)),
        RegistryError::InvalidAgentId(_)
    ));
    let op = Op::Claim(ClaimArgs {
        agent_id: "a".into(),
        ttl_secs: 0,
        force: false,
        proof: None,
        conn: None,
    });
    assert_eq!(log.refused(T0, op), RegistryError::BadTtl);
    let op = Op::Claim(ClaimArgs {
        agent_id: "a".into(),
        ttl_secs: MAX_TTL_SECS + 1,
        force: false,
        proof: None,
        conn: None,
    });
    assert_eq!(log.refused(T0, op), RegistryError::BadTtl);

    let mut empty = Log {
        sm: RegistryState::default(),
        next: 1,
    };
    assert_eq!(
        empty.refused(T0, claim_op("a", false, None, None)),
        RegistryError::NoSigningKey
    );
}

// ---- sessions ----

#[test]
fn claimed_id_registers_only_with_its_own_valid_certificate() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let b = log.claim(T0, "b");
    let err = log.refused(T0, register_op("a", conn(1, 1), None, false, false));
    assert_eq!(
        err,
        RegistryError::CertificateRequired {
            agent_id: "a".into()
        }
    );
    assert_eq!(
        log.refused(T0, register_op("a", conn(1, 1), Some(&b), false, false)),
        RegistryError::Certificate(Invalid::OtherAgent)
    );
    assert_eq!(
        log.refused(
            T0 + DAY,
            register_op("a", conn(1, 1), Some(&a), false, false)
        ),
        RegistryError::Certificate(Invalid::Expired)
    );
    let Outcome::Registered {
        session_id,
        replaced,
    } = log.register(T0, "a", conn(1, 1), Some(&a)).unwrap()
    else {
        panic!()
    };
    assert_eq!(replaced, None);
    assert_eq!(log.sm.session("a").unwrap().session_id, session_id);
    assert_eq!(log.sm.session("a").unwrap().cert_serial, Some(a.serial));
}

#[test]
fn a_valid_certificate_takes_over_a_session_on_any_node() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let Ok(Outcome::Registered { session_id: s1, .. }) =
        log.register(T0, "a", conn(1, 1), Some(&a))
    else {
        panic!()
    };
    let Outcome::Registered {
        session_id: s2,
        replaced,
    } = log.register(T0 + 1, "a", conn(3, 7), Some(&a)).unwrap()
    else {
        panic!()
    };
    assert!(s2 > s1);
    assert_eq!(
        replaced,
        Some(SessionRef {
            session_id: s1,
            conn: conn(1, 1)
        })
    );
    assert_eq!(log.sm.session("a").unwrap().conn, conn(3, 7));
}

#[test]
fn unclaimed_ids_register_without_certificate_and_force_needs_permission() {
    let mut log = Log::new();
    log.register(T0, "legacy", conn(1, 1), None).unwrap();
    assert_eq!(
        log.refused(T0, register_op("legacy", conn(2, 2), None, false, false)),
        RegistryError::AlreadyConnected {
            agent_id: "legacy".into(),
            node_id: 1
        }
    );
    // force_reconnect without a certificate: refused unless the node allows it.
    assert_eq!(
        log.refused(T0, register_op("legacy", conn(2, 2), None, true, false)),
        RegistryError::AlreadyConnected {
            agent_id: "legacy".into(),
            node_id: 1
        }
    );
    let Outcome::Registered { replaced, .. } =
        log.ok(T0, register_op("legacy", conn(2, 2), None, true, true))
    else {
        panic!()
    };
    assert_eq!(replaced.unwrap().conn, conn(1, 1));
    // ...but never for a claimed id.
    let c = log.claim(T0, "c");
    let _ = c;
    assert_eq!(
        log.refused(T0, register_op("c", conn(2, 2), None, true, true)),
        RegistryError::CertificateRequired {
            agent_id: "c".into()
        }
    );
}

#[test]
fn evictions_are_fenced_by_session_id() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let Ok(Outcome::Registered {
        session_id: old, ..
    }) = log.register(T0, "a", conn(1, 1), Some(&a))
    else {
        panic!()
    };
    let Ok(Outcome::Registered {
        session_id: new, ..
    }) = log.register(T0, "a", conn(2, 1), Some(&a))
    else {
        panic!()
    };
    assert_eq!(
        log.ok(
            T0,
            Op::Evict {
                agent_id: "a".into(),
                session_id: old
            }
        ),
        Outcome::SessionEnded { ended: None }
    );
    assert_eq!(log.sm.session("a").unwrap().session_id, new);
    assert_eq!(
        log.ok(
            T0,
            Op::Unregister {
                agent_id: "a".into(),
                session_id: old
            }
        ),
        Outcome::SessionEnded { ended: None }
    );
    assert_eq!(
        log.ok(
            T0,
            Op::Evict {
                agent_id: "a".into(),
                session_id: new
            }
        ),
        Outcome::SessionEnded {
            ended: Some(SessionRef {
                session_id: new,
                conn: conn(2, 1)
            })
        }
    );
    assert!(log.sm.session("a").is_none());
    assert!(
        log.sm.claim("a").is_some(),
        "evicting frees the connection, not the claim"
    );
}

#[test]
fn evict_node_spares_sessions_newer_than_its_fence_and_other_nodes() {
    let mut log = Log::new();
    log.register(T0, "x", conn(1, 1), None).unwrap();
    log.register(T0, "y", conn(2, 1), None).unwrap();
    let fence = log.next - 1;
    log.register(T0, "z", conn(1, 2), None).unwrap();
    let Outcome::NodeEvicted { removed } = log.ok(
        T0,
        Op::EvictNode {
            node_id: 1,
            max_session_id: fence,
        },
    ) else {
        panic!()
    };
    assert_eq!(
        removed
            .iter()
            .map(|(id, _)| id.as_str())
            .collect::<Vec<_>>(),
        vec!["x"]
    );
    assert!(log.sm.session("y").is_some());
    assert!(log.sm.session("z").is_some());
}

#[test]
fn oversized_metadata_is_refused() {
    let mut log = Log::new();
    let op = Op::Register {
        agent_id: "a".into(),
        conn: conn(1, 1),
        metadata: "x".repeat(MAX_METADATA_LEN + 1),
        certificate: None,
        force_reconnect: false,
        allow_uncertified_takeover: false,
    };
    assert_eq!(
        log.refused(T0, op),
        RegistryError::MetadataTooLarge(MAX_METADATA_LEN + 1)
    );
}

// ---- revocations ----

#[test]
fn revocation_invalidates_frees_the_id_and_ends_its_session() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    log.register(T0, "a", conn(1, 1), Some(&a)).unwrap();
    let Outcome::Revoked {
        serial,
        newly,
        ended,
    } = log.ok(
        T0 + 1,
        Op::RevokeCertificate {
            certificate: a.clone(),
            by: None,
        },
    )
    else {
        panic!()
    };
    assert_eq!((serial, newly), (a.serial, true));
    assert_eq!(ended.unwrap().1.conn, conn(1, 1));
    assert_eq!(log.sm.validate(&a, T0 + 2), Err(Invalid::Revoked));
    assert!(log.sm.claim("a").is_none());
    assert!(log.sm.session("a").is_none());
    // Idempotent.
    assert!(matches!(
        log.ok(
            T0 + 2,
            Op::RevokeCertificate {
                certificate: a.clone(),
                by: None
            }
        ),
        Outcome::Revoked { newly: false, .. }
    ));
    // The revoked certificate proves nothing any more.
    assert_eq!(
        log.refused(T0 + 3, register_op("a", conn(1, 1), Some(&a), false, false)),
        RegistryError::Certificate(Invalid::Revoked)
    );
    // The id can be claimed afresh.
    log.claim(T0 + 3, "a");
}

#[test]
fn forged_certificates_cannot_revoke() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let mut forged = a.clone();
    forged.serial += 100;
    assert_eq!(
        log.refused(
            T0,
            Op::RevokeCertificate {
                certificate: forged,
                by: None
            }
        ),
        RegistryError::Certificate(Invalid::BadSignature)
    );
    // Signed with a key the cluster never had, under an id it has and under one it has not.
    let foreign = Certificate::issue("a", a.serial, T0, T0 + DAY, "k1", &Secret::new(vec![9; 32]));
    assert_eq!(
        log.refused(
            T0,
            Op::RevokeCertificate {
                certificate: foreign,
                by: None
            }
        ),
        RegistryError::Certificate(Invalid::BadSignature)
    );
    let foreign = Certificate::issue(
        "a",
        a.serial,
        T0,
        T0 + DAY,
        "k999",
        &Secret::new(vec![9; 32]),
    );
    assert_eq!(
        log.refused(
            T0,
            Op::RevokeCertificate {
                certificate: foreign,
                by: None
            }
        ),
        RegistryError::Certificate(Invalid::UnknownKey)
    );
}

#[test]
fn release_revokes_and_needs_a_valid_certificate() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    assert_eq!(
        log.refused(
            T0 + DAY,
            Op::Release {
                certificate: a.clone(),
                by: None
            }
        ),
        RegistryError::Certificate(Invalid::Expired)
    );
    assert!(matches!(
        log.ok(
            T0,
            Op::Release {
                certificate: a.clone(),
                by: None
            }
        ),
        Outcome::Released { .. }
    ));
    assert!(log.sm.claim("a").is_none());
    assert_eq!(log.sm.validate(&a, T0), Err(Invalid::Revoked));
}

#[test]
fn operator_revocation_by_agent_id() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    assert_eq!(
        log.refused(
            T0,
            Op::RevokeAgent {
                agent_id: "nobody".into()
            }
        ),
        RegistryError::NotClaimed {
            agent_id: "nobody".into()
        }
    );
    log.ok(
        T0,
        Op::RevokeAgent {
            agent_id: "a".into(),
        },
    );
    assert_eq!(log.sm.validate(&a, T0), Err(Invalid::Revoked));
}

#[test]
fn revocations_are_kept_until_the_certificate_expired_plus_grace() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    log.ok(
        T0,
        Op::RevokeCertificate {
            certificate: a.clone(),
            by: None,
        },
    );
    log.claim(a.expires_at + EXPIRY_GRACE_SECS, "other");
    assert_eq!(log.sm.sizes().revocations, 1);
    log.claim(a.expires_at + EXPIRY_GRACE_SECS + 1, "other2");
    assert_eq!(log.sm.sizes().revocations, 0);
    // Rebuilding from the tables (a snapshot) keeps the index consistent.
    let b = log.claim(T0 + 10, "b");
    log.ok(
        T0 + 10,
        Op::RevokeCertificate {
            certificate: b.clone(),
            by: None,
        },
    );
    let mut restored = RegistryState::from_tables(log.sm.tables().clone());
    restored
        .apply(
            1000,
            &Command {
                at: b.expires_at + EXPIRY_GRACE_SECS + 1,
                op: Op::RetireKey {
                    key_id: "none".into(),
                },
            },
        )
        .unwrap_err();
    assert_eq!(restored.sizes().revocations, 0);
}

// ---- forgetting expired claims ----

impl Log {
    /// Applies ForgetExpiredClaims at `at`: (claims forgotten, whether more are due).
    fn forget(&mut self, at: u64) -> (u64, bool) {
        match self.ok(at, Op::ForgetExpiredClaims) {
            Outcome::ClaimsForgotten { forgotten, more } => (forgotten, more),
            o => panic!("{o:?}"),
        }
    }
}

#[test]
fn an_expired_claim_is_forgotten_an_hour_after_and_its_id_stays_free() {
    let mut log = Log::new();
    let a = log.token_claim(T0, "a", "token-of-the-claim-of-a");
    let b = log.claim(T0 + 100, "b");
    assert_eq!(log.sm.first_unheld_expiry(), Some(a.expires_at));
    // Not before its certificate expired and the grace went by.
    assert_eq!(log.forget(a.expires_at), (0, false));
    assert_eq!(log.forget(a.expires_at + EXPIRY_GRACE_SECS), (0, false));
    assert_eq!(log.sm.sizes().claims, 2);
    assert_eq!(log.forget(a.expires_at + EXPIRY_GRACE_SECS + 1), (1, false));
    assert!(log.sm.claim("a").is_none());
    assert!(
        log.sm.tables().claim_tokens.is_empty(),
        "its claim token goes with it"
    );
    assert!(log.sm.claim("b").is_some(), "b expired later");
    assert_eq!(log.sm.first_unheld_expiry(), Some(b.expires_at));
    // The certificate stays invalid, now for want of a claim, and the id is free.
    let later = a.expires_at + EXPIRY_GRACE_SECS + 2;
    assert_eq!(log.sm.validate(&a, later), Err(Invalid::Expired));
    let again = log.claim(later, "a");
    log.sm.validate(&again, later).unwrap();
}

#[test]
fn a_claim_its_session_holds_is_kept_until_the_session_ends() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let session_id = match log.register(T0, "a", conn(1, 1), Some(&a)).unwrap() {
        Outcome::Registered { session_id, .. } => session_id,
        o => panic!("{o:?}"),
    };
    let late = a.expires_at + EXPIRY_GRACE_SECS + 1;
    assert_eq!(log.forget(late), (0, false));
    assert_eq!(log.sm.first_unheld_expiry(), None);
    // The operator can still revoke the id, which ends the session.
    let mut revoked = Log {
        sm: log.sm.clone(),
        next: log.next,
    };
    match revoked.ok(
        late,
        Op::RevokeAgent {
            agent_id: "a".into(),
        },
    ) {
        Outcome::Revoked { ended, .. } => {
            assert_eq!(ended.map(|e| e.1.session_id), Some(session_id))
        }
        o => panic!("{o:?}"),
    }
    // Once the session has ended, the claim is forgotten.
    log.ok(
        late,
        Op::Unregister {
            agent_id: "a".into(),
            session_id,
        },
    );
    assert_eq!(log.forget(late + 1), (1, false));
    assert!(log.sm.claim("a").is_none());
}

#[test]
fn a_session_without_the_claims_certificate_does_not_hold_it() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let late = a.expires_at + EXPIRY_GRACE_SECS + 1;
    // Expired, so the id takes a session without a certificate; that holds nothing.
    log.register(a.expires_at, "a", conn(1, 1), None).unwrap();
    assert_eq!(log.forget(late), (1, false));
    assert!(log.sm.claim("a").is_none());
    assert!(log.sm.session("a").is_some(), "the session stays");
}

#[test]
fn a_claim_made_again_is_forgotten_by_its_own_expiry() {
    let mut log = Log::new();
    let first = log.claim(T0, "a");
    let second = match log.ok(T0 + 500, claim_op("a", true, Some(&first), None)) {
        Outcome::Claimed { certificate } => certificate,
        o => panic!("{o:?}"),
    };
    // Past the first certificate's expiry and grace, not the second's.
    assert_eq!(
        log.forget(first.expires_at + EXPIRY_GRACE_SECS + 1),
        (0, false)
    );
    assert_eq!(log.sm.claim("a").map(|c| c.serial), Some(second.serial));
    assert_eq!(
        log.forget(second.expires_at + EXPIRY_GRACE_SECS + 1),
        (1, false)
    );
}

#[test]
fn forgetting_takes_the_earliest_first_and_at_most_the_maximum() {
    let mut log = Log::new();
    let n = MAX_FORGOTTEN_PER_COMMAND + 5;
    for i in 0..n {
        log.claim(T0 + i as u64, &format!("id-{i:05}"));
    }
    let late = T0 + n as u64 + DAY + EXPIRY_GRACE_SECS;
    assert_eq!(log.forget(late), (MAX_FORGOTTEN_PER_COMMAND as u64, true));
    let left: Vec<String> = log.sm.tables().claims.keys().cloned().collect();
    let expected: Vec<String> = (MAX_FORGOTTEN_PER_COMMAND..n)
        .map(|i| format!("id-{i:05}"))
        .collect();
    assert_eq!(left, expected, "the earliest expired went first");
    assert_eq!(log.forget(late), (5, false));
    assert_eq!(log.sm.sizes().claims, 0);
}

/// Random commands over a few ids, connections and times: after each, the index of claims
/// that may be forgotten is exactly what the tables alone give (as after loading a
/// snapshot), so that every node forgets the same claims however it came by its tables.
#[test]
fn the_forgettable_claims_are_what_the_tables_say_after_any_commands() {
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    let ids = ["a", "b", "c", "d"];
    for seed in 0..20 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut log = Log::new();
        let mut certs: Vec<Certificate> = Vec::new();
        let mut at = T0;
        for _ in 0..400 {
            at += rng.gen_range(0..2 * EXPIRY_GRACE_SECS);
            let id = ids[rng.gen_range(0..ids.len())];
            let c = conn(rng.gen_range(1..3), rng.gen_range(1..3));
            let cert = (!certs.is_empty()).then(|| certs[rng.gen_range(0..certs.len())].clone());
            let op = match rng.gen_range(0..10) {
                0 | 1 => Op::Claim(ClaimArgs {
                    agent_id: id.into(),
                    ttl_secs: rng.gen_range(1..3 * EXPIRY_GRACE_SECS),
                    force: rng.gen_bool(0.3),
                    proof: cert.clone().filter(|c| c.agent_id == id),
                    conn: rng.gen_bool(0.5).then_some(c),
                }),
                2 | 3 => register_op(
                    id,
                    c,
                    cert.as_ref().filter(|_| rng.gen_bool(0.7)),
                    false,
                    false,
                ),
                4 => match log.sm.session(id) {
                    Some(s) => Op::Unregister {
                        agent_id: id.into(),
                        session_id: s.session_id,
                    },
                    None => Op::ForgetExpiredClaims,
                },
                5 => Op::EvictNode {
                    node_id: c.node_id,
                    max_session_id: u64::MAX,
                },
                6 => match cert {
                    Some(certificate) if rng.gen_bool(0.5) => Op::Release {
                        certificate,
                        by: None,
                    },
                    Some(certificate) => Op::RevokeCertificate {
                        certificate,
                        by: None,
                    },
                    None => Op::RevokeAgent {
                        agent_id: id.into(),
                    },
                },
                7 => Op::RevokeAgent {
                    agent_id: id.into(),
                },
                _ => Op::ForgetExpiredClaims,
            };
            if let Ok(Outcome::Claimed { certificate }) = log.apply(at, op.clone()) {
                certs.push(certificate);
            }
            let rebuilt = RegistryState::from_tables(log.sm.tables().clone());
            assert_eq!(
                log.sm.claim_expiry, rebuilt.claim_expiry,
                "seed {seed}, after {op:?} at {at}"
            );
        }
    }
}

// ---- claim tokens ----

fn token_claim(id: &str, force: bool, proof: Option<&Certificate>, token: &str) -> Op {
    let Op::Claim(claim) = claim_op(id, force, proof, None) else {
        unreachable!()
    };
    Op::ClaimWithToken {
        claim,
        token: TokenHash::of(token),
    }
}

impl Log {
    fn token_claim(&mut self, at: u64, id: &str, token: &str) -> Certificate {
        match self.ok(at, token_claim(id, false, None, token)) {
            Outcome::Claimed { certificate } => certificate,
            o => panic!("{o:?}"),
        }
    }

    /// Sends `op` again: it must be answered with `cert`, changing nothing.
    fn repeated(&mut self, at: u64, op: Op, cert: &Certificate) {
        let before = self.sm.tables().clone();
        match self.ok(at, op) {
            Outcome::ClaimRepeated { certificate } => assert_eq!(&certificate, cert),
            o => panic!("not repeated: {o:?}"),
        }
        assert_eq!(
            self.sm.tables(),
            &before,
            "a repeated claim changed the tables"
        );
    }
}

#[test]
fn a_claim_sent_again_with_its_token_gets_the_same_certificate() {
    let mut log = Log::new();
    let cert = log.token_claim(T0, "a", "token-of-the-first-claim");
    // Later, from another connection (the first node died before it answered).
    let mut again = token_claim("a", false, None, "token-of-the-first-claim");
    if let Op::ClaimWithToken { claim, .. } = &mut again {
        claim.conn = Some(conn(2, 7));
    }
    log.repeated(T0 + 5, again, &cert);
    log.sm.validate_for(&cert, "a", T0 + 5).unwrap();
    // Anyone else is refused, with or without a token of their own.
    assert!(matches!(
        log.refused(T0 + 5, claim_op("a", false, None, None)),
        RegistryError::AlreadyClaimed { .. }
    ));
    assert!(matches!(
        log.refused(
            T0 + 5,
            token_claim("a", false, None, "another-claimants-token")
        ),
        RegistryError::AlreadyClaimed { .. }
    ));
}

#[test]
fn a_reissue_sent_again_with_its_token_gets_the_reissued_certificate() {
    let mut log = Log::new();
    let first = log.claim(T0, "a");
    let reissue = token_claim("a", true, Some(&first), "token-of-the-reissue");
    let Outcome::Claimed {
        certificate: second,
    } = log.ok(T0 + 1, reissue.clone())
    else {
        panic!()
    };
    assert_ne!(second.serial, first.serial);
    // Its proof is superseded now; the repeat is answered all the same.
    log.repeated(T0 + 2, reissue, &second);
    assert_eq!(
        log.sm.validate(&first, T0 + 2),
        Err(Invalid::Superseded),
        "the repeat issued nothing"
    );
}

#[test]
fn a_claim_token_counts_only_while_its_certificate_is_current() {
    let mut log = Log::new();
    let token = "token-of-the-first-claim";
    // Superseded by a re-issue made without the token.
    let a = log.token_claim(T0, "a", token);
    log.ok(T0 + 1, claim_op("a", true, Some(&a), None));
    assert!(matches!(
        log.refused(T0 + 2, token_claim("a", false, None, token)),
        RegistryError::AlreadyClaimed { .. }
    ));
    assert!(log.sm.tables().claim_tokens.is_empty());
    // Revoked: the id is free, and the same token makes a new claim.
    let b = log.token_claim(T0, "b", token);
    log.ok(
        T0 + 1,
        Op::RevokeAgent {
            agent_id: "b".into(),
        },
    );
    assert!(log.sm.tables().claim_tokens.is_empty());
    let b2 = log.token_claim(T0 + 2, "b", token);
    assert_ne!(b2.serial, b.serial);
    // Expired: a new claim too.
    let later = b2.expires_at;
    let b3 = log.token_claim(later, "b", token);
    assert_ne!(b3.serial, b2.serial);
    assert_eq!(log.sm.tables().claim_tokens.len(), 1);
}

#[test]
fn a_repeat_is_refused_once_the_key_that_signed_it_is_retired() {
    let mut log = Log::new();
    let a = log.token_claim(T0, "a", "token-of-the-first-claim");
    log.ok(
        T0,
        Op::RotateKey {
            secret: Secret::new(vec![3; 32]),
        },
    );
    log.repeated(
        T0,
        token_claim("a", false, None, "token-of-the-first-claim"),
        &a,
    );
    log.ok(
        T0,
        Op::RetireKey {
            key_id: a.key_id.clone(),
        },
    );
    assert_eq!(
        log.refused(
            T0,
            token_claim("a", false, None, "token-of-the-first-claim")
        ),
        RegistryError::Certificate(Invalid::RetiredKey)
    );
}

#[test]
fn claim_tokens_are_in_the_digest_and_survive_a_snapshot() {
    let mut log = Log::new();
    log.claim(T0, "a");
    let plain = log.sm.tables().digest();
    let mut with_token = Log::new();
    let cert = with_token.token_claim(T0, "a", "token-of-the-first-claim");
    assert_ne!(with_token.sm.tables().digest(), plain);
    // Only the hash is kept.
    let encoded =
        bincode::serde::encode_to_vec(with_token.sm.tables(), bincode::config::standard()).unwrap();
    assert!(!encoded
        .windows(b"token-of-the-first-claim".len())
        .any(|w| w == b"token-of-the-first-claim"));
    // Rebuilt from the tables (a snapshot), the claim still repeats.
    let mut restored = Log {
        sm: RegistryState::from_tables(with_token.sm.tables().clone()),
        next: with_token.next,
    };
    restored.repeated(
        T0 + 1,
        token_claim("a", false, None, "token-of-the-first-claim"),
        &cert,
    );
}

// ---- keyring ----

#[test]
fn keyring_initialises_once() {
    let mut log = Log::new();
    let Outcome::KeyringInitialized { key_id, created } = log.ok(
        T0,
        Op::InitKeyring {
            secret: Secret::new(vec![2; 32]),
        },
    ) else {
        panic!()
    };
    assert_eq!((key_id.as_str(), created), ("k1", false));
    assert_eq!(log.sm.keyring().len(), 1);
}

#[test]
fn rotated_keys_keep_validating_until_retired() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let Outcome::KeyRotated { key_id } = log.ok(
        T0,
        Op::RotateKey {
            secret: Secret::new(vec![3; 32]),
        },
    ) else {
        panic!()
    };
    let b = log.claim(T0, "b");
    assert_eq!(b.key_id, key_id);
    assert_eq!(a.key_id, "k1");
    log.sm.validate(&a, T0).unwrap();
    assert!(matches!(
        log.refused(
            T0,
            Op::RetireKey {
                key_id: key_id.clone()
            }
        ),
        RegistryError::Keyring(_)
    ));
    log.ok(
        T0,
        Op::RetireKey {
            key_id: "k1".into(),
        },
    );
    assert_eq!(log.sm.keyring().get("k1").unwrap().state, KeyState::Retired);
    assert_eq!(log.sm.validate(&a, T0), Err(Invalid::RetiredKey));
    log.sm.validate(&b, T0).unwrap();
}

#[test]
fn apply_is_deterministic() {
    let ops = |log: &mut Log| {
        let a = log.claim(T0, "a");
        let _ = log.register(T0, "a", conn(1, 1), Some(&a));
        let _ = log.apply(
            T0 + 1,
            Op::RotateKey {
                secret: Secret::new(vec![5; 32]),
            },
        );
        let _ = log.apply(T0 + 2, claim_op("a", true, Some(&a), None));
        let _ = log.apply(
            T0 + 3,
            Op::RevokeAgent {
                agent_id: "a".into(),
            },
        );
    };
    let (mut x, mut y) = (Log::new(), Log::new());
    ops(&mut x);
    ops(&mut y);
    assert_eq!(x.sm.tables(), y.sm.tables());
}

// ---- batches (group commit) ----

fn batch(cmds: Vec<(u64, Op)>) -> Op {
    Op::Batch(
        cmds.into_iter()
            .map(|(at, op)| Command { at, op })
            .collect(),
    )
}

fn answers(o: Outcome) -> Vec<Response> {
    match o {
        Outcome::Batch(a) => a,
        o => panic!("not a batch answer: {o:?}"),
    }
}

#[test]
fn a_batch_answers_each_command_as_if_alone_with_increasing_ids() {
    let mut log = Log::new();
    let c = conn(1, 7);
    // Index 2 carries a batch: two claims of "a" (the second refused), a claim of "b" and a
    // registration of an unclaimed id.
    let out = answers(log.ok(
        T0,
        batch(vec![
            (T0, claim_op("a", false, None, None)),
            (T0, claim_op("a", false, None, None)),
            (T0, claim_op("b", false, None, None)),
            (T0, register_op("free", c, None, false, false)),
        ]),
    ));
    assert_eq!(out.len(), 4);
    let cert_a = match &out[0] {
        Ok(Outcome::Claimed { certificate }) => certificate.clone(),
        o => panic!("{o:?}"),
    };
    assert_eq!(
        out[1],
        Err(RegistryError::AlreadyClaimed {
            agent_id: "a".into()
        }),
        "the second claim of one id in a batch sees the first"
    );
    let cert_b = match &out[2] {
        Ok(Outcome::Claimed { certificate }) => certificate.clone(),
        o => panic!("{o:?}"),
    };
    let session = match &out[3] {
        Ok(Outcome::Registered { session_id, .. }) => *session_id,
        o => panic!("{o:?}"),
    };
    // The first command takes the entry's index; a refused one takes no id.
    assert_eq!((cert_a.serial, cert_b.serial, session), (2, 3, 4));
    log.sm.validate(&cert_a, T0 + 1).unwrap();
    log.sm.validate(&cert_b, T0 + 1).unwrap();
    // The next entry (index 3) must not reuse an id the batch gave out.
    let cert_c = log.claim(T0, "c");
    assert_eq!(cert_c.serial, 5);
    assert_eq!(log.sm.last_issued_id(3), 5);
    // ...and once the log index passes the ids again, it is the index.
    log.next = 100;
    assert_eq!(log.claim(T0, "d").serial, 100);
}

#[test]
fn a_batch_may_not_nest_and_its_other_commands_still_apply() {
    let mut log = Log::new();
    let out = answers(log.ok(
        T0,
        batch(vec![
            (T0, batch(vec![(T0, claim_op("inner", false, None, None))])),
            (T0, claim_op("outer", false, None, None)),
        ]),
    ));
    assert_eq!(out[0], Err(RegistryError::NestedBatch));
    assert!(matches!(out[1], Ok(Outcome::Claimed { .. })));
    assert!(log.sm.claim("inner").is_none());
    assert!(log.sm.claim("outer").is_some());
}

#[test]
fn session_ends_are_reported_for_every_command_of_a_batch() {
    let mut log = Log::new();
    let cert = log.claim(T0, "a");
    let Outcome::Registered { session_id, .. } =
        log.register(T0, "a", conn(1, 1), Some(&cert)).unwrap()
    else {
        panic!()
    };
    let op = batch(vec![
        (T0, register_op("a", conn(2, 9), Some(&cert), false, false)),
        (T0, claim_op("x", false, None, None)),
    ]);
    let outcome = log.ok(T0, op.clone());
    let ends = SessionEnd::from_applied(&op, &outcome);
    assert_eq!(ends.len(), 1, "{ends:?}");
    assert_eq!(ends[0].agent_id, "a");
    assert_eq!(ends[0].session.session_id, session_id);
    assert!(matches!(ends[0].cause, EndCause::TakenOver { .. }));
}

// ---- encoding ----

/// The tables encode byte for byte as they did with `std`'s `BTreeMap`s (and decode from
/// that encoding), so snapshots, backups and the replicas' digests are unchanged by the
/// persistent maps.
#[test]
fn tables_encode_as_std_btreemaps_did() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    log.claim(T0, "c");
    log.token_claim(T0, "b", "token-of-b");
    let d = log.claim(T0, "d");
    log.register(T0, "d", conn(1, 1), Some(&d))
        .expect("registered");
    log.revoke(T0 + 1, a);
    let t = log.sm.tables().clone();
    assert_eq!(
        (t.claims.len(), t.sessions.len(), t.revocations.len()),
        (3, 1, 1)
    );
    #[derive(Serialize)]
    struct StdTables<'a> {
        claims: std::collections::BTreeMap<&'a String, &'a Claim>,
        sessions: std::collections::BTreeMap<&'a String, &'a Session>,
        revocations: std::collections::BTreeMap<&'a u64, &'a Revocation>,
        keyring: &'a crate::identity::Keyring,
        next_id: u64,
        claim_tokens: std::collections::BTreeMap<&'a String, &'a ClaimToken>,
    }
    let std_tables = StdTables {
        claims: t.claims.iter().collect(),
        sessions: t.sessions.iter().collect(),
        revocations: t.revocations.iter().collect(),
        keyring: &t.keyring,
        next_id: t.next_id,
        claim_tokens: t.claim_tokens.iter().collect(),
    };
    let config = bincode::config::standard();
    let old = bincode::serde::encode_to_vec(&std_tables, config).unwrap();
    assert_eq!(bincode::serde::encode_to_vec(&t, config).unwrap(), old);
    let (decoded, _): (Tables, usize) = bincode::serde::decode_from_slice(&old, config).unwrap();
    assert_eq!(decoded, t);
}

/// A copy of the state (what a snapshot takes while apply waits for the lock) shares the
/// tables instead of copying every entry, and writes applied after it do not show in it.
#[test]
fn a_copy_of_the_tables_shares_them_and_keeps_what_it_saw() {
    let mut log = Log::new();
    let certificates: Vec<Certificate> = (0..1000)
        .map(|i| log.claim(T0, &format!("agent-{i}")))
        .collect();
    let copy = log.sm.clone();
    assert!(copy.tables().claims.ptr_eq(&log.sm.tables().claims));
    assert!(copy.tables().sessions.ptr_eq(&log.sm.tables().sessions));
    log.claim(T0, "later");
    log.register(T0, "agent-1", conn(1, 1), Some(&certificates[1]))
        .expect("registered");
    assert_eq!(copy.tables().claims.len(), 1000);
    assert!(copy.claim("later").is_none() && copy.session("agent-1").is_none());
    assert!(log.sm.claim("later").is_some() && log.sm.session("agent-1").is_some());
}

/// The digest of tables holding no claim token is what builds before claim tokens computed
/// for the same tables (`agentreg status` compares the replicas' digests, also during a
/// rolling upgrade): frozen from such a build.
#[test]
fn digest_without_claim_tokens_is_what_earlier_builds_computed() {
    let mut log = Log::new();
    let a = log.claim(T0, "a");
    let b = log.claim(T0, "b");
    log.register(T0, "b", conn(1, 1), Some(&b))
        .expect("registered");
    log.revoke(T0 + 1, a);
    assert_eq!(
        log.sm.tables().digest(),
        "963b5879958b6a1d2a23a7ccc2186122e34d6dfc511402dbb696831320892039"
    );
}
