//! Inbound HBONE request checks on arbitrary method, authority and `forwarded` header values:
//! every input gets a target or a 400/503, never a panic, and a target is always the arrival pod.
#![no_main]

use std::net::IpAddr;

use ferry::proxy::hbone::proto::{forwarded_for, inbound_target};
use http::{HeaderValue, Method, Uri};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: (&str, &str, &[u8])| {
    let (method, authority, forwarded) = input;
    let arrived_on: IpAddr = "10.2.0.2".parse().unwrap();
    if let (Ok(method), Ok(uri)) =
        (Method::from_bytes(method.as_bytes()), Uri::builder().authority(authority).build())
    {
        // A service hostname maps to the port its length gives: any port, proxy ports included.
        let service_port = |host: &str, _| u16::try_from(host.len()).ok();
        if let Ok(target) = inbound_target(&method, &uri, arrived_on, service_port) {
            assert_eq!(target.ip(), arrived_on);
            assert!(!matches!(target.port(), 15001 | 15006 | 15008));
        }
    }
    if let Ok(value) = HeaderValue::from_bytes(forwarded) {
        let _ = forwarded_for(&value);
    }
});
