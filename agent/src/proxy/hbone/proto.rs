//! The HBONE CONNECT request, built and checked without I/O so every rule is testable in memory.

use std::net::{IpAddr, SocketAddr};

use http::{
    Method, Request, StatusCode, Uri,
    header::{FORWARDED, HeaderName, HeaderValue},
};

use crate::{proxy::is_proxy_port, state::Workload};

/// Who sends the CONNECT (its namespace and pod), and who answers it with 200.
pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Why an inbound CONNECT is refused, and with which status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// 400: not CONNECT, unparsable authority, or authority IP is not the pod the TLS arrived on.
    BadRequest(&'static str),
    /// 503: nothing to deliver to (recursion to a proxy port, unknown target, app refused).
    Unavailable(&'static str),
}

impl Rejection {
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::BadRequest(r) | Rejection::Unavailable(r) => r,
        }
    }
}

/// The target of an inbound CONNECT that arrived (TLS) on `arrived_on`. The authority is
/// `<this pod's IP>:<port>`, or `<service hostname>:<service port>` (ztunnel sends that where
/// the client does not pick the endpoint, e.g. through a gateway): that goes to this pod's port
/// for the service port, which `service_port` gives if this pod is one of the service's endpoints.
pub fn inbound_target(
    method: &Method,
    uri: &Uri,
    arrived_on: IpAddr,
    service_port: impl FnOnce(&str, u16) -> Option<u16>,
) -> Result<SocketAddr, Rejection> {
    if method != Method::CONNECT {
        return Err(Rejection::BadRequest("method is not CONNECT"));
    }
    let authority = uri.authority().ok_or(Rejection::BadRequest("no :authority"))?;
    let target: SocketAddr = match (authority.as_str().parse(), authority.port_u16()) {
        (Ok(addr), _) => addr,
        (Err(_), Some(port)) => match service_port(authority.host(), port) {
            Some(target_port) => SocketAddr::new(arrived_on, target_port),
            None => return Err(Rejection::Unavailable("no service of this pod by that hostname and port")),
        },
        (Err(_), None) => return Err(Rejection::BadRequest("authority is not host:port")),
    };
    if target.ip() != arrived_on {
        return Err(Rejection::BadRequest("authority IP is not the pod the connection arrived on"));
    }
    if is_proxy_port(target.port()) {
        return Err(Rejection::Unavailable("target port is a proxy port (recursion)"));
    }
    Ok(target)
}

/// The outbound CONNECT for `target` on behalf of `client` (the app's address) in `source`;
/// `service_host` when the app dialled a service that resolved to `target`.
pub fn connect_request(
    target: SocketAddr,
    client: SocketAddr,
    service_host: Option<&str>,
    source: &Workload,
    trace_id: u128,
    span_id: u64,
) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = Method::CONNECT;
    // SocketAddr's Display brackets IPv6, as :authority requires.
    *request.uri_mut() =
        Uri::builder().authority(target.to_string()).build().expect("ip:port is a valid authority");
    let forwarded = match service_host {
        Some(host) => format!("for=\"{client}\";host={host}"),
        None => format!("for=\"{client}\""),
    };
    let baggage = baggage(source);
    let traceparent = format!("00-{trace_id:032x}-{span_id:016x}-00");
    // A client port and a trace ID are new with every connection: HPACK sends them never indexed,
    // as otherwise they would fill its table and push out the values that repeat (the authority,
    // the baggage), and every later lookup would walk through them.
    for (name, value, unique) in
        [(FORWARDED, forwarded, true), (BAGGAGE, baggage, false), (TRACEPARENT, traceparent, true)]
    {
        if let Ok(mut value) = HeaderValue::try_from(value) {
            value.set_sensitive(unique);
            request.headers_mut().insert(name, value);
        }
    }
    request
}

/// The `baggage` that says who `workload` is: the client's with CONNECT, the destination's with 200.
pub fn baggage(workload: &Workload) -> String {
    format!("k8s.namespace.name={},k8s.pod.name={}", workload.namespace, workload.name)
}

/// The original client from a `forwarded: for="ip:port"` header, if well formed.
pub fn forwarded_for(value: &HeaderValue) -> Option<SocketAddr> {
    value.to_str().ok()?.split(';').find_map(|part| {
        let v = part.trim().strip_prefix("for=")?;
        v.trim_matches('"').parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "10.2.0.2";

    /// This pod serves service `web.shop.svc.cluster.local` port 80 on 8080, and port 81 on 15008.
    fn target(method: Method, authority: &str) -> Result<SocketAddr, Rejection> {
        let uri: Uri = Uri::builder().authority(authority).build().unwrap();
        inbound_target(&method, &uri, POD.parse().unwrap(), |host, port| match (host, port) {
            ("web.shop.svc.cluster.local", 80) => Some(8080),
            ("web.shop.svc.cluster.local", 81) => Some(15008),
            _ => None,
        })
    }

    #[test]
    fn accepts_connect_to_the_arrival_pod() {
        assert_eq!(target(Method::CONNECT, "10.2.0.2:8080"), Ok("10.2.0.2:8080".parse().unwrap()));
        let by_service = target(Method::CONNECT, "web.shop.svc.cluster.local:80");
        assert_eq!(by_service, Ok("10.2.0.2:8080".parse().unwrap()));
    }

    #[test]
    fn rejects_like_ztunnel() {
        let cases: &[(Method, &str, StatusCode)] = &[
            (Method::GET, "10.2.0.2:8080", StatusCode::BAD_REQUEST),
            (Method::POST, "10.2.0.2:8080", StatusCode::BAD_REQUEST),
            (Method::CONNECT, "10.2.0.3:8080", StatusCode::BAD_REQUEST),
            (Method::CONNECT, "10.2.0.2", StatusCode::BAD_REQUEST),
            (Method::CONNECT, "backend.default.svc:8080", StatusCode::SERVICE_UNAVAILABLE),
            (Method::CONNECT, "web.shop.svc.cluster.local:8080", StatusCode::SERVICE_UNAVAILABLE),
            (Method::CONNECT, "web.shop.svc.cluster.local:81", StatusCode::SERVICE_UNAVAILABLE),
            (Method::CONNECT, "web.shop.svc.cluster.local", StatusCode::BAD_REQUEST),
            (Method::CONNECT, "10.2.0.2:15001", StatusCode::SERVICE_UNAVAILABLE),
            (Method::CONNECT, "10.2.0.2:15006", StatusCode::SERVICE_UNAVAILABLE),
            (Method::CONNECT, "10.2.0.2:15008", StatusCode::SERVICE_UNAVAILABLE),
        ];
        for (method, authority, status) in cases {
            let rejection = target(method.clone(), authority).unwrap_err();
            assert_eq!(rejection.status(), *status, "{method} {authority}: {rejection:?}");
        }
    }

    #[test]
    fn builds_the_connect_request() {
        let source = Workload {
            name: "a".into(),
            workload_name: None,
            namespace: "shop".into(),
            service_account: "sa".into(),
            labels: Default::default(),
            ips: vec![],
            node: "n1".into(),
            meshed: true,
            ready: true,
            ports: Default::default(),
            netns: None,
            cgroup: None,
        };
        let req = connect_request(
            "10.2.0.2:8080".parse().unwrap(),
            "10.1.0.2:4321".parse().unwrap(),
            None,
            &source,
            1,
            2,
        );
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().to_string(), "10.2.0.2:8080");
        assert_eq!(req.headers()["forwarded"], "for=\"10.1.0.2:4321\"");
        assert_eq!(req.headers()["baggage"], "k8s.namespace.name=shop,k8s.pod.name=a");
        assert_eq!(req.headers()["traceparent"], format!("00-{:032x}-{:016x}-00", 1, 2));
        let never_indexed = |name: &str| req.headers()[name].is_sensitive();
        assert!(never_indexed("forwarded") && never_indexed("traceparent") && !never_indexed("baggage"));
        assert_eq!(forwarded_for(&req.headers()["forwarded"]), Some("10.1.0.2:4321".parse().unwrap()));
        let v6 = connect_request(
            "[fd00::2]:80".parse().unwrap(),
            "[fd00::1]:1".parse().unwrap(),
            None,
            &source,
            1,
            2,
        );
        assert_eq!(v6.uri().authority().unwrap().as_str(), "[fd00::2]:80");
        // A service the app dialled travels as the forwarded host; the client address still parses.
        let via_service = connect_request(
            "10.2.0.2:8080".parse().unwrap(),
            "10.1.0.2:4321".parse().unwrap(),
            Some("web.shop.svc.cluster.local"),
            &source,
            1,
            2,
        );
        let forwarded = &via_service.headers()["forwarded"];
        assert_eq!(forwarded, "for=\"10.1.0.2:4321\";host=web.shop.svc.cluster.local");
        assert_eq!(forwarded_for(forwarded), Some("10.1.0.2:4321".parse().unwrap()));
    }
}
