//! Turns the raw file into a [`Config`], collecting every problem instead of stopping early.
//! Each section is checked by the module that defines it; what spans sections (a route naming
//! an upstream, the top-level `auth:` as every route's default) is put together here.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use super::problems::Problems;
use super::raw::RawConfig;
use super::*;

pub fn validate(raw: RawConfig) -> Draft {
    let mut p = Problems(Vec::new());

    let server = server::validate(&mut p, &raw.server);
    let admin = admin::validate(&mut p, &raw.admin);
    let log = log::validate(&mut p, &raw.log);

    let mut upstreams = BTreeMap::new();
    for (name, u) in &raw.upstreams {
        if let Some(up) = upstream::validate(&mut p, name, u) {
            upstreams.insert(name.clone(), up);
        }
    }

    let auth = raw
        .auth
        .as_ref()
        .and_then(|a| auth::validate(&mut p, "auth", a))
        .map(Arc::new);

    if raw.routes.is_empty() {
        p.add("routes", "no routes: add at least one route");
    }
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    for (i, r) in raw.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        let mut route = route::validate(&mut p, &key, r, &server, &upstreams, &raw.upstreams);
        if let Some(route) = &mut route {
            (route.auth, route.auth_origin) = match &r.auth {
                None if auth.is_some() => (auth.clone(), AuthOrigin::Global),
                None => (None, AuthOrigin::None),
                Some(a) => match auth::validate(&mut p, &format!("{key}.auth"), a) {
                    Some(own) => (Some(Arc::new(own)), AuthOrigin::Route),
                    None => (None, AuthOrigin::Disabled),
                },
            };
        }
        if let Some(route) = route {
            if !names.insert(route.name.clone()) {
                p.add(
                    format!("{key}.name"),
                    format!("`{}`: duplicate route name", route.name),
                );
            }
            routes.push(route);
        }
    }

    Draft {
        config: Config {
            server,
            admin,
            log,
            upstreams,
            routes,
            auth,
            pending_restart: Vec::new(),
        },
        problems: p.0,
        env: EnvSources::default(),
    }
}
