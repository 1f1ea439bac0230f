use serde_json::json;

use super::*;
use crate::identity::Secret;

fn cert() -> Certificate {
    Certificate::issue(
        "my-agent",
        4,
        1_700_000_000,
        1_700_086_400,
        "k1",
        &Secret::new(vec![1; 32]),
    )
}

fn parse(v: Value) -> Envelope {
    parse_request(v.to_string().as_bytes())
}

/// The text of a request refused as malformed.
fn err_of(v: Value) -> String {
    let r = parse(v).request.expect_err("accepted");
    assert_eq!(r.code, ErrorCode::BadRequest, "{}", r.error);
    r.error
}

#[test]
fn every_command_parses() {
    let c = serde_json::to_value(cert()).unwrap();
    let cases = [
        (
            json!({"type":"system_request","command":"claim_agent_id","agent_id":"my-agent","force":true,"certificate":c}),
            AgentRequest::ClaimAgentId {
                agent_id: "my-agent".into(),
                force: true,
                certificate: Some(cert()),
                claim_token: None,
            },
        ),
        (
            json!({"type":"system_request","command":"claim_agent_id","agent_id":"my-agent"}),
            AgentRequest::ClaimAgentId {
                agent_id: "my-agent".into(),
                force: false,
                certificate: None,
                claim_token: None,
            },
        ),
        (
            json!({"type":"system_request","command":"claim_agent_id","agent_id":"my-agent","claim_token":"0123456789abcdef"}),
            AgentRequest::ClaimAgentId {
                agent_id: "my-agent".into(),
                force: false,
                certificate: None,
                claim_token: Some("0123456789abcdef".into()),
            },
        ),
        (
            json!({"type":"system_request","command":"validate_certificate","certificate":c}),
            AgentRequest::ValidateCertificate {
                certificate: cert(),
                consistency: Consistency::Linearizable,
            },
        ),
        (
            json!({"type":"system_request","command":"validate_certificate","certificate":c,"consistency":"local"}),
            AgentRequest::ValidateCertificate {
                certificate: cert(),
                consistency: Consistency::Local,
            },
        ),
        (
            json!({"type":"system_request","command":"ping_agent","timestamp":1640995200.5}),
            AgentRequest::PingAgent {
                timestamp: json!(1640995200.5),
            },
        ),
        (
            json!({"type":"system_request","command":"register_agent","agent_id":"my-agent","metadata":{"name":"x"},"certificate":c,"force_reconnect":true}),
            AgentRequest::RegisterAgent {
                agent_id: "my-agent".into(),
                metadata: json!({"name":"x"}).as_object().unwrap().clone(),
                certificate: Some(cert()),
                force_reconnect: true,
            },
        ),
        (
            json!({"type":"system_request","command":"unregister_agent","agent_id":"my-agent"}),
            AgentRequest::UnregisterAgent {
                agent_id: "my-agent".into(),
            },
        ),
        (
            json!({"type":"system_request","command":"release_agent_id","agent_id":"my-agent","certificate":c}),
            AgentRequest::ReleaseAgentId {
                certificate: cert(),
            },
        ),
        (
            json!({"type":"system_request","command":"revoke_certificate","certificate":c,"future_field":1}),
            AgentRequest::RevokeCertificate {
                certificate: cert(),
            },
        ),
    ];
    for (msg, want) in cases {
        assert_eq!(parse(msg.clone()).request, Ok(want), "{msg}");
    }
}

#[test]
fn request_id_is_kept_even_when_the_request_is_bad() {
    let e = parse(json!({"type":"system_request","command":"nope","request_id":"r-1"}));
    assert_eq!(e.request_id, Some(json!("r-1")));
    assert_eq!(e.command.as_deref(), Some("nope"));
    let r = e.request.unwrap_err();
    assert_eq!(r.code, ErrorCode::UnknownCommand);
    assert!(r.error.contains("unknown command \"nope\""));
    let e = parse(json!({"type":"system_request","command":"claim_agent_id","request_id":7}));
    assert_eq!(e.request_id, Some(json!(7)));
    assert_eq!(
        e.request.unwrap_err(),
        Refusal::new(ErrorCode::BadRequest, "missing field agent_id")
    );
    assert!(err_of(
        json!({"type":"system_request","command":"ping_agent","timestamp":1,"request_id":[1]})
    )
    .contains("request_id"));
}

#[test]
fn responses_echo_request_id_and_keep_the_shapes() {
    let ok = ok_response(
        "ping_agent",
        Some(&json!(7)),
        json!({"timestamp": 5}).as_object().unwrap().clone(),
    );
    let v: Value = serde_json::from_slice(&ok).unwrap();
    assert_eq!(
        v,
        json!({"type":"system_response","command":"ping_agent","success":true,"request_id":7,"timestamp":5})
    );
    let err = error_response(
        Some("claim_agent_id"),
        Some(&json!("abc")),
        &Refusal::new(ErrorCode::AlreadyClaimed, "Agent ID a is already claimed"),
    );
    let v: Value = serde_json::from_slice(&err).unwrap();
    assert_eq!(
        v,
        json!({"type":"system_response","command":"claim_agent_id","success":false,"request_id":"abc","code":"already_claimed","error":"Agent ID a is already claimed"})
    );
    let v: Value =
        serde_json::from_slice(&error_response(None, None, &"x".to_owned().into())).unwrap();
    assert_eq!(
        v,
        json!({"type":"system_response","success":false,"code":"bad_request","error":"x"})
    );
    assert!(parse_response(&err).is_ok());
    assert!(parse_response(b"{\"type\":\"system_request\"}").is_err());
}

#[test]
fn bad_inputs_get_clear_errors() {
    let e = parse_request(&[0xff, 0xfe, b'{']).request.unwrap_err();
    assert_eq!(e.error, "request is not valid UTF-8");
    let e = parse_request(b"{not json").request.unwrap_err();
    assert_eq!(e.code, ErrorCode::BadRequest);
    assert!(e.error.contains("not valid JSON"));
    for (v, k) in [
        (json!([1]), "an array"),
        (json!("s"), "a string"),
        (json!(3), "a number"),
        (json!(null), "null"),
    ] {
        assert_eq!(err_of(v), format!("request must be a JSON object, not {k}"));
    }
    assert!(err_of(json!({"command":"ping_agent","timestamp":1})).contains("missing field type"));
    assert!(
        err_of(json!({"type":"system_response","command":"ping_agent","timestamp":1}))
            .contains("system_request")
    );
    assert_eq!(
        err_of(json!({"type":"system_request"})),
        "missing field command"
    );
    assert!(
        err_of(json!({"type":"system_request","command":5})).contains("command must be a string")
    );
    assert_eq!(
        err_of(json!({"type":"system_request","command":"claim_agent_id","agent_id":5})),
        "field agent_id must be a string, not a number"
    );
    assert!(
        err_of(json!({"type":"system_request","command":"claim_agent_id","agent_id":""}))
            .contains("empty")
    );
    assert_eq!(
        err_of(
            json!({"type":"system_request","command":"claim_agent_id","agent_id":"a","force":"yes"})
        ),
        "field force must be true or false, not a string"
    );
    let token_err = |t: Value| {
        err_of(
            json!({"type":"system_request","command":"claim_agent_id","agent_id":"a","claim_token":t}),
        )
    };
    let shape = "field claim_token must be 16 to 128 visible ASCII characters";
    assert_eq!(token_err(json!("0123456789abcde")), shape, "15 characters");
    assert_eq!(token_err(json!("x".repeat(129))), shape);
    assert_eq!(token_err(json!("0123456789 abcdef")), shape, "a space");
    assert_eq!(token_err(json!("0123456789abcdéf")), shape, "not ASCII");
    assert_eq!(
        token_err(json!(12345678901234567u64)),
        "field claim_token must be a string, not a number"
    );
    assert!(parse(json!({"type":"system_request","command":"claim_agent_id","agent_id":"a","claim_token":"x".repeat(128)})).request.is_ok());
    assert_eq!(
        err_of(
            json!({"type":"system_request","command":"register_agent","agent_id":"a","metadata":[1]})
        ),
        "field metadata must be an object, not an array"
    );
    assert_eq!(
        err_of(
            json!({"type":"system_request","command":"validate_certificate","certificate":"abc"})
        ),
        "field certificate must be an object, not a string"
    );
    let c = serde_json::to_value(cert()).unwrap();
    assert_eq!(
        err_of(
            json!({"type":"system_request","command":"validate_certificate","certificate":c,"consistency":"stale"})
        ),
        "field consistency must be \"linearizable\" or \"local\", not \"stale\""
    );
    assert_eq!(
        err_of(
            json!({"type":"system_request","command":"validate_certificate","certificate":c,"consistency":1})
        ),
        "field consistency must be a string, not a number"
    );
    assert_eq!(
        err_of(json!({"type":"system_request","command":"validate_certificate"})),
        "missing field certificate"
    );
    let mut no_sig = c.clone();
    no_sig.as_object_mut().unwrap().remove("signature");
    let e = err_of(
        json!({"type":"system_request","command":"validate_certificate","certificate":no_sig}),
    );
    assert!(
        e.starts_with("certificate is malformed") && e.contains("signature"),
        "{e}"
    );
    let mut frac = c.clone();
    frac["issued_at"] = json!(1700000000.25);
    let e = err_of(
        json!({"type":"system_request","command":"validate_certificate","certificate":frac}),
    );
    assert!(e.starts_with("certificate is malformed"), "{e}");
    assert_eq!(
        err_of(json!({"type":"system_request","command":"ping_agent","timestamp":"now"})),
        "field timestamp must be a number, not a string"
    );
    assert_eq!(
        parse(json!({"type":"system_request","command":"release_agent_id","agent_id":"other","certificate":c}))
            .request
            .unwrap_err(),
        Refusal::new(
            ErrorCode::CertificateOtherAgent,
            "certificate validation failed: issued for another agent"
        )
    );
}

/// Every code has one name on the wire, read back as itself; docs/protocol.md lists every
/// one of them (a client in another language is written from it).
#[test]
fn error_codes_have_one_name_each_and_are_documented() {
    let doc = include_str!("../../docs/protocol.md");
    let mut names = std::collections::HashSet::new();
    for &(code, name) in ErrorCode::ALL {
        assert!(names.insert(name), "{name} twice");
        assert_eq!(code.as_str(), name);
        assert_eq!(ErrorCode::of_answer(Some(name), "whatever"), code);
        assert!(
            doc.contains(&format!("| `{name}` |")),
            "{name} is not in docs/protocol.md's table"
        );
    }
    assert_eq!(
        ErrorCode::of_answer(Some("a_code_of_a_newer_node"), "x"),
        ErrorCode::Unrecognized
    );
    assert!(
        !names.contains(ErrorCode::Unrecognized.as_str()),
        "never sent"
    );
}

/// An answer of a node of a build before codes carries none: the client reads what it acts
/// on from the text, and nothing else.
#[test]
fn answers_without_a_code_are_read_from_their_text() {
    let of = |t: &str| ErrorCode::of_answer(None, t);
    assert_eq!(
        of("write outcome unknown: leader 2 did not answer"),
        ErrorCode::OutcomeUnknown
    );
    assert_eq!(of("cluster unavailable: no leader"), ErrorCode::Unavailable);
    assert_eq!(of(SHUTTING_DOWN_ERROR), ErrorCode::ShuttingDown);
    assert_eq!(of(CONNECTION_CLOSING_ERROR), ErrorCode::ConnectionClosing);
    assert_eq!(of("Agent ID a is already claimed"), ErrorCode::Unrecognized);
    // A code wins over the text.
    assert_eq!(
        ErrorCode::of_answer(Some("already_claimed"), "cluster unavailable: x"),
        ErrorCode::AlreadyClaimed
    );
}

#[test]
fn certificate_codes_are_the_certificates_and_only_they() {
    use crate::identity::Invalid::*;
    for why in [
        Expired,
        BadSignature,
        OtherAgent,
        Revoked,
        UnknownKey,
        RetiredKey,
        Superseded,
        NotClaimed,
    ] {
        assert!(ErrorCode::of_invalid(why).is_certificate(), "{why}");
    }
    let certificates = ErrorCode::ALL
        .iter()
        .filter(|(c, _)| c.is_certificate())
        .count();
    assert_eq!(certificates, 8);
    assert!(!ErrorCode::CertificateRequired.is_certificate());
}

/// The close reasons a client may act on are quoted in docs/protocol.md as the node sends
/// them.
#[test]
fn close_reasons_are_the_documented_ones() {
    let doc = include_str!("../../docs/protocol.md").replace('\n', " ");
    for reason in [NOT_SERVED_REASON, FAULT_REASON] {
        assert!(
            doc.contains(&format!("`{reason}`")),
            "{reason} is not quoted in docs/protocol.md"
        );
    }
}
