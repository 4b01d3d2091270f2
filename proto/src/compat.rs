//! Wire compatibility between two versions of the contract.
//!
//! Agents and coordinators of neighbouring versions talk to each other (see [`crate::skew`]), so the protobuf
//! contract may only grow. [`breaking_changes`] compares an old and a new `FileDescriptorSet` and lists every
//! change that would make one side misread the other:
//!
//! - a message, enum, service or RPC that disappeared;
//! - a field number that disappeared without being reserved in the new message;
//! - a field whose number now carries another type (scalar kind or message/enum name) or cardinality
//!   (`repeated` vs singular; `optional` presence changes are allowed), or whose name moved to another number
//!   (renumbered);
//! - an enum value number that disappeared without being reserved, or an enum name moved to another number;
//! - an RPC whose request or response type or streaming changed.
//!
//! Renaming a field while keeping its number and type is allowed (the wire is unchanged). Names are compared
//! fully qualified.

use std::collections::BTreeMap;

use prost::Message;
use prost_types::field_descriptor_proto::Label;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet, ServiceDescriptorProto};

/// Why a descriptor set could not be compared.
#[derive(Debug, thiserror::Error)]
#[error("the {which} descriptor set is not a valid FileDescriptorSet ({source}); rebuild it with protoc")]
pub struct DecodeError {
    which: &'static str,
    source: prost::DecodeError,
}

/// Decodes a serialized `FileDescriptorSet`.
pub fn decode(which: &'static str, bytes: &[u8]) -> Result<FileDescriptorSet, DecodeError> {
    FileDescriptorSet::decode(bytes).map_err(|source| DecodeError { which, source })
}

#[derive(Default)]
struct Index<'a> {
    messages: BTreeMap<String, &'a DescriptorProto>,
    enums: BTreeMap<String, &'a EnumDescriptorProto>,
    services: BTreeMap<String, &'a ServiceDescriptorProto>,
}

fn index_message<'a>(idx: &mut Index<'a>, prefix: &str, m: &'a DescriptorProto) {
    let name = format!("{prefix}.{}", m.name());
    for nested in &m.nested_type {
        index_message(idx, &name, nested);
    }
    for e in &m.enum_type {
        idx.enums.insert(format!("{name}.{}", e.name()), e);
    }
    idx.messages.insert(name, m);
}

fn index(set: &FileDescriptorSet) -> Index<'_> {
    let mut idx = Index::default();
    for file in &set.file {
        let prefix = if file.package().is_empty() {
            String::new()
        } else {
            format!(".{}", file.package())
        };
        for m in &file.message_type {
            index_message(&mut idx, &prefix, m);
        }
        for e in &file.enum_type {
            idx.enums.insert(format!("{prefix}.{}", e.name()), e);
        }
        for s in &file.service {
            idx.services.insert(format!("{prefix}.{}", s.name()), s);
        }
    }
    idx
}

/// The type a field carries on the wire, comparable across versions.
fn field_type(f: &prost_types::FieldDescriptorProto) -> String {
    if f.type_name().is_empty() {
        format!("{:?}", f.r#type())
    } else {
        f.type_name().to_string()
    }
}

fn reserved_number(m: &DescriptorProto, n: i32) -> bool {
    // Message reserved ranges are [start, end).
    m.reserved_range.iter().any(|r| r.start() <= n && n < r.end())
}

fn reserved_enum_number(e: &EnumDescriptorProto, n: i32) -> bool {
    // Enum reserved ranges are [start, end].
    e.reserved_range.iter().any(|r| r.start() <= n && n <= r.end())
}

fn compare_message(name: &str, old: &DescriptorProto, new: &DescriptorProto, out: &mut Vec<String>) {
    let new_by_number: BTreeMap<i32, _> = new.field.iter().map(|f| (f.number(), f)).collect();
    let new_by_name: BTreeMap<&str, _> = new.field.iter().map(|f| (f.name(), f)).collect();
    for f in &old.field {
        let n = f.number();
        match new_by_number.get(&n) {
            None if reserved_number(new, n) => {}
            None => match new_by_name.get(f.name()) {
                Some(moved) => out.push(format!(
                    "{name}.{} was renumbered from {n} to {}: field numbers are the wire format; keep {n}",
                    f.name(),
                    moved.number()
                )),
                None => out.push(format!(
                    "{name}: field {n} ({}) was removed without `reserved {n};`: old peers still send it",
                    f.name()
                )),
            },
            Some(g) => {
                if field_type(f) != field_type(g) {
                    out.push(format!(
                        "{name}: field {n} ({}) changed type from {} to {}: add a new field instead",
                        f.name(),
                        field_type(f),
                        field_type(g)
                    ));
                }
                let repeated = |x: &prost_types::FieldDescriptorProto| x.label() == Label::Repeated;
                if repeated(f) != repeated(g) {
                    out.push(format!(
                        "{name}: field {n} ({}) changed between repeated and singular",
                        f.name()
                    ));
                }
            }
        }
    }
}

fn compare_enum(name: &str, old: &EnumDescriptorProto, new: &EnumDescriptorProto, out: &mut Vec<String>) {
    for v in &old.value {
        let n = v.number();
        if new.value.iter().any(|w| w.number() == n) || reserved_enum_number(new, n) {
            continue;
        }
        match new.value.iter().find(|w| w.name() == v.name()) {
            Some(w) => out.push(format!(
                "{name}.{} was renumbered from {n} to {}: keep {n}",
                v.name(),
                w.number()
            )),
            None => out.push(format!(
                "{name}: value {n} ({}) was removed without reserving it",
                v.name()
            )),
        }
    }
}

fn compare_service(name: &str, old: &ServiceDescriptorProto, new: &ServiceDescriptorProto, out: &mut Vec<String>) {
    for m in &old.method {
        let Some(n) = new.method.iter().find(|n| n.name() == m.name()) else {
            out.push(format!("{name}/{} was removed: old peers still call it", m.name()));
            continue;
        };
        if m.input_type() != n.input_type() || m.output_type() != n.output_type() {
            out.push(format!(
                "{name}/{} changed from ({}) -> ({}) to ({}) -> ({})",
                m.name(),
                m.input_type(),
                m.output_type(),
                n.input_type(),
                n.output_type()
            ));
        }
        if m.client_streaming() != n.client_streaming() || m.server_streaming() != n.server_streaming() {
            out.push(format!("{name}/{} changed its streaming", m.name()));
        }
    }
}

/// Every change from `old` to `new` that breaks peers built from `old`; empty when `new` only grew.
pub fn breaking_changes(old: &FileDescriptorSet, new: &FileDescriptorSet) -> Vec<String> {
    let (old, new) = (index(old), index(new));
    let mut out = Vec::new();
    for (name, m) in &old.messages {
        match new.messages.get(name) {
            Some(n) => compare_message(name, m, n, &mut out),
            None => out.push(format!("message {name} was removed")),
        }
    }
    for (name, e) in &old.enums {
        match new.enums.get(name) {
            Some(n) => compare_enum(name, e, n, &mut out),
            None => out.push(format!("enum {name} was removed")),
        }
    }
    for (name, s) in &old.services {
        match new.services.get(name) {
            Some(n) => compare_service(name, s, n, &mut out),
            None => out.push(format!("service {name} was removed")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_types::field_descriptor_proto::Type;
    use prost_types::{FieldDescriptorProto, FileDescriptorProto};

    #[test]
    fn the_current_contract_keeps_every_released_field() {
        let old = decode("released", crate::RELEASED_DESCRIPTOR_SET).unwrap();
        let new = decode("current", crate::FILE_DESCRIPTOR_SET).unwrap();
        assert!(!index(&old).messages.is_empty(), "the released set holds the contract");
        let broken = breaking_changes(&old, &new);
        assert!(
            broken.is_empty(),
            "proto/nimbus/v1/nimbus.proto breaks the released contract (proto/released/):\n{}",
            broken.join("\n")
        );
    }

    fn field(name: &str, number: i32, ty: Type) -> FieldDescriptorProto {
        FieldDescriptorProto {
            name: Some(name.into()),
            number: Some(number),
            r#type: Some(ty as i32),
            label: Some(Label::Optional as i32),
            ..Default::default()
        }
    }

    fn set(fields: Vec<FieldDescriptorProto>, reserved: &[i32]) -> FileDescriptorSet {
        FileDescriptorSet {
            file: vec![FileDescriptorProto {
                package: Some("nimbus.v1".into()),
                message_type: vec![DescriptorProto {
                    name: Some("Hello".into()),
                    field: fields,
                    reserved_range: reserved
                        .iter()
                        .map(|&n| prost_types::descriptor_proto::ReservedRange {
                            start: Some(n),
                            end: Some(n + 1),
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn growth_is_fine_and_every_kind_of_break_is_named() {
        let old = set(
            vec![
                field("node_id", 1, Type::String),
                field("agent_version", 2, Type::String),
                field("probe_port", 3, Type::Uint32),
            ],
            &[],
        );
        let grown = set(
            vec![
                field("id_of_node", 1, Type::String),
                field("agent_version", 2, Type::String),
                field("probe_port", 3, Type::Uint32),
                field("extra", 4, Type::Bool),
            ],
            &[],
        );
        assert_eq!(
            breaking_changes(&old, &grown),
            Vec::<String>::new(),
            "renames and additions are fine"
        );

        let reserved = set(
            vec![field("node_id", 1, Type::String), field("probe_port", 3, Type::Uint32)],
            &[2],
        );
        assert!(
            breaking_changes(&old, &reserved).is_empty(),
            "a removal with `reserved` is fine"
        );

        let removed = set(
            vec![field("node_id", 1, Type::String), field("probe_port", 3, Type::Uint32)],
            &[],
        );
        let b = breaking_changes(&old, &removed);
        assert!(
            b.len() == 1 && b[0].contains("field 2 (agent_version) was removed"),
            "{b:?}"
        );

        let renumbered = set(
            vec![
                field("node_id", 1, Type::String),
                field("agent_version", 5, Type::String),
                field("probe_port", 3, Type::Uint32),
            ],
            &[],
        );
        let b = breaking_changes(&old, &renumbered);
        assert!(b.len() == 1 && b[0].contains("renumbered from 2 to 5"), "{b:?}");

        let retyped = set(
            vec![
                field("node_id", 1, Type::String),
                field("agent_version", 2, Type::String),
                field("probe_port", 3, Type::Uint64),
            ],
            &[],
        );
        let b = breaking_changes(&old, &retyped);
        assert!(
            b.len() == 1 && b[0].contains("changed type from Uint32 to Uint64"),
            "{b:?}"
        );

        let mut repeated = field("probe_port", 3, Type::Uint32);
        repeated.label = Some(Label::Repeated as i32);
        let relabelled = set(
            vec![
                field("node_id", 1, Type::String),
                field("agent_version", 2, Type::String),
                repeated,
            ],
            &[],
        );
        let b = breaking_changes(&old, &relabelled);
        assert!(b.len() == 1 && b[0].contains("repeated and singular"), "{b:?}");

        let gone = FileDescriptorSet { file: vec![] };
        let b = breaking_changes(&old, &gone);
        assert_eq!(b, vec!["message .nimbus.v1.Hello was removed".to_string()]);
    }
}
